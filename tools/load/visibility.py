"""Write -> visible-to-search latency against a running fhirmesh (see README.md).

Creates a Patient with a fresh identifier, then searches for it by identifier, N times, and prints
the percentiles of (search answered with the Patient) - (create answered). The search does not send
X-Consistency-Token, so the server's default read-your-writes wait is what is measured.
"""
import http.client
import json
import sys
import time
import uuid

host, port = sys.argv[1].split(":") if len(sys.argv) > 1 else ("127.0.0.1", "8080")
count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
conn = http.client.HTTPConnection(host, int(port))
latencies = []
for _ in range(count):
    value = uuid.uuid4().hex
    body = json.dumps({"resourceType": "Patient", "identifier": [{"system": "urn:vis", "value": value}]})
    conn.request("POST", "/Patient", body, {"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
    response = conn.getresponse()
    response.read()
    assert response.status == 201, response.status
    written = time.perf_counter()
    for _attempt in range(1000):
        conn.request("GET", f"/Patient?identifier=urn:vis%7C{value}&_total=none")
        found = json.loads(conn.getresponse().read())
        if found.get("entry"):
            break
    else:
        sys.exit(f"identifier {value} never became searchable")
    latencies.append((time.perf_counter() - written) * 1000)
latencies.sort()
pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
print(f"write -> searchable over {count} writes: p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {latencies[-1]:.2f} ms")
