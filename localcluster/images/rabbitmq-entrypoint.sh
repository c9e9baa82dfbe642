#!/bin/sh
# Stand-in for the rabbitmq image's start on the localcluster node agent: Debian's RabbitMQ 3.10
# does not read RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (the official image's server does), so
# copy the chart's conf.d into the (writable) home volume, add default_user / default_pass there,
# point RABBITMQ_CONFIG_FILES at the copy, then exec the server. They only matter on the first boot.
set -eu
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  src="${RABBITMQ_CONFIG_FILES:-/etc/rabbitmq/conf.d/*.conf}"
  dir="${HOME:-/var/lib/rabbitmq}/localcluster-conf.d"
  umask 077
  rm -rf "$dir"
  mkdir -p "$dir"
  for f in $src; do
    [ -f "$f" ] && cp "$f" "$dir/"
  done
  printf 'default_user = %s\ndefault_pass = %s\n' "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" > "$dir/00-localcluster-default-user.conf"
  RABBITMQ_CONFIG_FILES="$dir/*.conf"
  export RABBITMQ_CONFIG_FILES
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
