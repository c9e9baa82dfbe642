#!/bin/sh
# Stand-in for the rabbitmq image's start on the localcluster node agent: Debian's RabbitMQ 3.10
# does not read RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (the official image's server does), so
# write them as default_user / default_pass into a main config file in the (writable) home volume,
# next to the chart's conf.d, then exec the server. They only matter on the first boot.
set -eu
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  conf="${HOME:-/var/lib/rabbitmq}/localcluster-default-user.conf"
  umask 077
  printf 'default_user = %s\ndefault_pass = %s\n' "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" > "$conf"
  RABBITMQ_CONFIG_FILE="$conf"
  export RABBITMQ_CONFIG_FILE
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
