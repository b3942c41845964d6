# Stand-in for the official rabbitmq:*-management image, from Debian's packages (RabbitMQ 3.10; no
# registry here). Honours what docker-compose.yml uses: RABBITMQ_DEFAULT_USER/_PASS,
# RABBITMQ_ERLANG_COOKIE, RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS, node name rabbit@<hostname>, logs on
# stdout, the management plugin, rabbitmq-diagnostics for healthchecks.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends rabbitmq-server \
 && rabbitmq-plugins --offline enable rabbitmq_management \
 && echo "# node name, addresses: the defaults (rabbit@<hostname>, all interfaces)" > /etc/rabbitmq/rabbitmq-env.conf \
 && rm -rf /var/lib/apt/lists/*
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=-
COPY rabbitmq-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
EXPOSE 4369 5672 15672 25672
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
