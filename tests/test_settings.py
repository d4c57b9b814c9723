from pathlib import Path

import pytest

from bilten.settings import ROLES, SettingsError, from_env, parse_roles


def test_defaults_need_nothing():
    settings = from_env({})
    assert settings.database_url == ""
    assert settings.redis_url == ""
    assert settings.roles == ROLES
    assert settings.data_dir == Path(".bilten")
    assert settings.log_level == "INFO"


def test_bilten_urls_win_over_conventional_ones():
    settings = from_env(
        {
            "BILTEN_DATABASE_URL": "postgresql://a/b",
            "DATABASE_URL": "postgresql://c/d",
            "REDIS_URL": "redis://localhost:6379/2",
        }
    )
    assert settings.database_url == "postgresql://a/b"
    assert settings.redis_url == "redis://localhost:6379/2"


def test_settings_are_frozen():
    settings = from_env({})
    with pytest.raises(AttributeError):
        settings.log_level = "DEBUG"  # type: ignore[misc]


def test_secret_never_in_repr():
    settings = from_env({"BILTEN_SECRET_KEY": "s" * 40})
    assert "s" * 40 not in repr(settings)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BILTEN_DATABASE_URL": "mysql://x/y"}, "BILTEN_DATABASE_URL must start with"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL must start with"),
        ({"BILTEN_DB_POOL_MAX": "many"}, "BILTEN_DB_POOL_MAX must be an integer"),
        ({"BILTEN_DB_POOL_MAX": "0"}, "at least 1"),
        ({"BILTEN_DB_POOL_MIN": "9", "BILTEN_DB_POOL_MAX": "3"}, "exceeds"),
        ({"BILTEN_LOG_LEVEL": "loud"}, "BILTEN_LOG_LEVEL"),
        ({"BILTEN_ROLES": "api,cron"}, "roles"),
        ({"BILTEN_SECRET_KEY": "short"}, "32+ characters"),
        ({"BILTEN_LIMIT_LOGIN_EMAIL": "five"}, "BILTEN_LIMIT_LOGIN_EMAIL must look like 5/60"),
        ({"BILTEN_SMTP_URL": "http://mail"}, "BILTEN_SMTP_URL must start with"),
        ({"BILTEN_READY_TIMEOUT": "-1"}, "positive"),
        ({"BILTEN_MAIL_SHARE": "1.5"}, "BILTEN_MAIL_SHARE must be a share between 0 and 1"),
        ({"BILTEN_MAIL_SHARE": "0"}, "positive"),
    ],
)
def test_invalid_configuration_is_one_clear_line(env, fragment):
    with pytest.raises(SettingsError) as info:
        from_env(env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_roles():
    assert parse_roles("api, workers") == {"api", "workers"}
    with pytest.raises(SettingsError):
        parse_roles("")
