"""The seed's sender design (seed 000): Flask + pika, one AMQP connection per
request, durable classic queue, persistent messages, no publisher confirms.
Used only by `make bench` as the baseline warren-sender is compared with."""
import os

import pika
from flask import Flask, jsonify, request

app = Flask(__name__)
AMQP_URL = os.environ["AMQP_URL"]
QUEUE = os.environ["QUEUE"]


@app.route("/send", methods=["POST"])
def send():
    data = request.get_json(silent=True) or {}
    message = data.get("message")
    if not isinstance(message, str) or not message.strip():
        return jsonify({"error": "message is required"}), 400
    dots = message.count(".")
    if dots > 5 and dots not in (30, 40):
        return jsonify({"error": "dot rule"}), 400
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_declare(queue=QUEUE, durable=True)
    channel.basic_publish(
        exchange="",
        routing_key=QUEUE,
        body=message,
        properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
    )
    connection.close()
    return jsonify({"status": "sent", "message": message}), 200


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
