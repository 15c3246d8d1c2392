"""gunicorn settings for the service: `gunicorn -c gunicorn.conf.py 'main:create_app()'`.

Settings come from the same validated environment as the app, so a bad value
stops start-up here with a message that names the variable.
"""
import os
import sys

from config import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as error:
    sys.exit(f"Configuration error: {error}")

if not _settings.allow_model_download:
    # The service must never reach for the network at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

bind = f"0.0.0.0:{_settings.port}"
worker_class = "gthread"
workers = 1
threads = 8
# gthread workers heartbeat from their main thread, so a long request does not trip this.
timeout = 120
graceful_timeout = 30
accesslog = "-"
# gunicorn 25+ opens a control socket for `gunicornc` under $XDG_RUNTIME_DIR or
# $HOME/.gunicorn; the service does not use it, and the container's numeric
# user has no writable home, so it is off.
control_socket_disable = True
