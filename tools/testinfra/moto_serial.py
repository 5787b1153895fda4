"""moto in server mode, with DynamoDB requests handled one at a time.

Why: moto's TransactWriteItems is not isolated. It deep-copies the table before a transaction and,
when the transaction is cancelled, puts that copy back — undoing every write other requests made
to the table meanwhile (acknowledged writes vanish under concurrency). DynamoDB itself never does
that: each request is atomic. Serializing DynamoDB and DynamoDB Streams requests (they are told
apart by their X-Amz-Target header) restores that guarantee; other services (SQS long polls in
particular, which sleep inside the request) stay concurrent.

usage: python3 moto_serial.py -H 127.0.0.1 -p PORT
"""

import argparse
import signal
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()

    moto_app = DomainDispatcherApplication(create_backend_app)
    dynamodb = threading.Lock()

    def app(environ, start_response):
        if environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB"):
            with dynamodb:
                result = moto_app(environ, start_response)
                try:
                    return [b"".join(result)]
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        return moto_app(environ, start_response)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
