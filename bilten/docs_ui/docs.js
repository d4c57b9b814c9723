// Swagger UI over /openapi.json, with try-it-out on and the sign-in carried to every call.
"use strict";

const SIGN_IN = new Set(["/auth/login", "/auth/register", "/auth/refresh"]);

// Swagger UI 4 reads OpenAPI 3.0 only; the document is 3.1 and, aside from "type": "null"
// among the variants of a nullable field, uses nothing 3.0 lacks.
function asOpenApi30(spec) {
  return { ...spec, openapi: "3.0.3" };
}

// A new address each time the page loads, so that registering twice does not collide; signing
// in afterwards uses the same one.
function freshEmail(spec) {
  const email = `dev-${Math.random().toString(36).slice(2, 10)}@example.com`;
  for (const path of ["/auth/register", "/auth/login", "/auth/forgot-password"]) {
    const example = spec.paths[path]?.post?.requestBody?.content["application/json"]?.example;
    if (example) example.email = email;
  }
}

function signInOnce(response) {
  const token = response.body && response.body.access_token;
  if (response.ok && token && SIGN_IN.has(new URL(response.url, location.href).pathname)) {
    window.ui.preauthorizeApiKey("bearer", token);
  }
  return response;
}

fetch("/openapi.json")
  .then((answer) => answer.json())
  .then((spec) => {
    freshEmail(spec);
    window.ui = SwaggerUIBundle({
      spec: asOpenApi30(spec),
      dom_id: "#swagger-ui",
      deepLinking: true,
      tryItOutEnabled: true,
      persistAuthorization: true,
      displayRequestDuration: true,
      validatorUrl: null,
      responseInterceptor: signInOnce,
    });
  });
