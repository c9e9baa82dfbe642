"""The seed's worker (seed 000), the baseline of `make bench`'s worker figures.

What seed 000 runs in its worker containers: pika's BlockingConnection,
basic_qos(prefetch_count=1), manual ack after the work, one second of sleep
per dot in the message, two printed lines per job (shown live by
`docker logs -f`, so printed unbuffered).

Differences from the seed, all needed to point it at warren's queue:
- The queue name and AMQP URL come from the environment (QUEUE, AMQP_URL).
- The queue already exists with warren's arguments (dead-lettering), so it is
  declared passively: a plain durable declare would fail with
  PRECONDITION_FAILED on the differing arguments.
- The body is warren's JSON envelope; the dots are counted in its `message`
  field (the seed's body was the bare message). SECONDS_PER_DOT (default 1,
  the seed's) scales the sleep like WARREN_SECONDS_PER_DOT does for warren.
"""

import json
import os
import sys
import time

import pika

SECONDS_PER_DOT = float(os.environ.get("SECONDS_PER_DOT", "1"))


def message_of(body: bytes) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


def callback(ch, method, properties, body):
    message = message_of(body)
    print(f" [x] Received {message}", flush=True)
    time.sleep(message.count(".") * SECONDS_PER_DOT)
    print(" [x] Done", flush=True)
    ch.basic_ack(delivery_tag=method.delivery_tag)


def main() -> int:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    queue = os.environ.get("QUEUE", "task_queue")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True, passive=True)
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=queue, on_message_callback=callback)
    print(" [*] Waiting for messages. To exit press CTRL+C", flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
