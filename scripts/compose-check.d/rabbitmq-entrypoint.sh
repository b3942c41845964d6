#!/bin/sh
set -eu
conf=/etc/rabbitmq/rabbitmq.conf
{
  echo "loopback_users = none"
  [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER"
  [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS"
  true
} > "$conf"
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
  printf '%s' "$RABBITMQ_ERLANG_COOKIE" > "$HOME/.erlang.cookie"
  unset RABBITMQ_ERLANG_COOKIE
fi
chown -R rabbitmq:rabbitmq "$HOME" /etc/rabbitmq
[ -f "$HOME/.erlang.cookie" ] && chmod 400 "$HOME/.erlang.cookie"
export RABBITMQ_NODENAME="rabbit@$(hostname)"
exec setpriv --reuid rabbitmq --regid rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server
