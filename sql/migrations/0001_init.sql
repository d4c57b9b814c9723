-- The schema grows from here; each later change is a new numbered file.
CREATE EXTENSION IF NOT EXISTS citext;
