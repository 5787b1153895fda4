"""moto in server mode, with DynamoDB requests handled one at a time and transactions rolled back
item by item.

Why: moto's TransactWriteItems is not isolated. It deep-copies the table before a transaction and,
when the transaction is cancelled, puts that copy back — undoing every write other requests made
to the table meanwhile (acknowledged writes vanish under concurrency). DynamoDB itself never does
that: each request is atomic. Serializing DynamoDB and DynamoDB Streams requests (they are told
apart by their X-Amz-Target header) restores that guarantee; other services (SQS long polls in
particular, which sleep inside the request) stay concurrent.

The deep copy has two more costs, both fixed by `journal_rollback` below: it copies the whole
table (with its stream) once per item of the transaction, so a commit costs time proportional to
everything ever written (tests slow down quadratically); and the rollback swaps in a copy of the
stream shard, so a stream reader keeps the orphaned shard with the cancelled writes in it.
Instead, the items a transaction touches are saved before it runs, and a cancelled transaction
puts them back and drops the stream records it added — what DynamoDB shows: nothing happened.

S3's CompleteMultipartUpload and ListParts answers: since moto 5.2 (up to at least 5.2.5) their
XML root is `{Operation}Response` instead of S3's `CompleteMultipartUploadResult` / `ListPartsResult`
(getmoto/moto#10055, fixed by #10056 after 5.2.5), which the AWS SDKs refuse. `s3_xml_roots`
renames the root of those two answers, so every process of the mesh can run multipart uploads
against moto as against S3.

And a Query on a table (not an index) sorts every item of the table to pick the partition's items
(`Table.all_items`): a read costs time proportional to the table. `partition_queries` hands such a
query only its partition's items, as DynamoDB does.

usage: python3 moto_serial.py -H 127.0.0.1 -p PORT
"""

import argparse
import copy
import signal
import sys
import threading

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


class _TablesNotCopied:
    """Stands in for the `copy` module inside moto's DynamoDB backend: tables are not copied
    (the journal restores what a cancelled transaction changed), everything else is."""

    @staticmethod
    def deepcopy(obj, memo=None):
        return obj if isinstance(obj, Table) else copy.deepcopy(obj, memo)

    def __getattr__(self, name):
        return getattr(copy, name)


def _touched(backend, transact_items):
    """(table, hash, range) of every item the transaction names, with a copy of what is there."""
    saved = []
    for entry in transact_items:
        _, op = next(iter(entry.items()))
        table = backend.tables.get(op.get("TableName"))
        if table is None:
            continue
        key = op.get("Item") if "Item" in op else op.get("Key")
        if not key or table.hash_key_attr not in key:
            continue
        hash_value = DynamoType(key[table.hash_key_attr])
        range_value = None
        if table.range_key_attr is not None:
            if table.range_key_attr not in key:
                continue
            range_value = DynamoType(key[table.range_key_attr])
        current = table.get_item(hash_value, range_value)
        saved.append((table, hash_value, range_value, copy.deepcopy(current)))
    return saved


def _restore(saved, stream_lengths):
    for table, hash_value, range_value, item in reversed(saved):
        if range_value is None:
            if item is None:
                table.items.pop(hash_value, None)
            else:
                table.items[hash_value] = item
        else:
            if item is None:
                table.items[hash_value].pop(range_value, None)
            else:
                table.items[hash_value][range_value] = item
    for table, length in stream_lengths.items():
        del table.stream_shard.items[length:]


def partition_queries():
    original = Table.query

    def query(self, hash_key, *args, **kwargs):
        index_name = args[6] if len(args) > 6 else kwargs.get("index_name")
        if index_name is not None or hash_key is None:
            return original(self, hash_key, *args, **kwargs)
        partition = self.items.get(hash_key)
        if partition is None:
            items = []
        elif self.range_key_attr:
            items = list(partition.values())
        else:
            items = [partition]
        # Requests are serialized (see `main`): shadowing the method for this call is safe.
        self.all_items = lambda: items
        try:
            return original(self, hash_key, *args, **kwargs)
        finally:
            del self.all_items

    Table.query = query


def journal_rollback():
    dynamodb_models.copy = _TablesNotCopied()
    original = dynamodb_models.DynamoDBBackend.transact_write_items

    def transact_write_items(self, transact_items):
        saved = _touched(self, transact_items)
        streams = {table: len(table.stream_shard.items) for table, _, _, _ in saved if table.stream_shard}
        try:
            return original(self, transact_items)
        except Exception:
            _restore(saved, streams)
            raise

    dynamodb_models.DynamoDBBackend.transact_write_items = transact_write_items


S3_ROOT_RENAMES = [
    (b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult"),
    (b"ListPartsResponse", b"ListPartsResult"),
]


def s3_xml_roots(app):
    """Wraps a WSGI app: renames the XML root of S3 answers about a multipart upload (`uploadId`
    in the query) whose root moto names wrongly; everything else passes untouched."""

    def wrapped(environ, start_response):
        if "uploadId=" not in environ.get("QUERY_STRING", "") or environ.get("HTTP_X_AMZ_TARGET"):
            return app(environ, start_response)
        captured = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"], captured["exc_info"] = status, headers, exc_info
            return lambda data: None

        result = app(environ, capture)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        head = body[:300]
        for wrong, right in S3_ROOT_RENAMES:
            if b"<" + wrong in head:
                body = body.replace(b"<" + wrong, b"<" + right, 1).replace(b"</" + wrong + b">", b"</" + right + b">", 1)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()

    journal_rollback()
    partition_queries()
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
    run_simple(args.host, args.port, s3_xml_roots(app), threaded=True)


if __name__ == "__main__":
    main()
