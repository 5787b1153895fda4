#!/usr/bin/env python3
"""Transaction benchmarks against a running fhirmesh (stdlib only; bounded, stops by itself).

  python3 tools/load/bundles.py HOST:PORT tx100 N        # N sequential 100-entry transactions: p50/p90/p99
  python3 tools/load/bundles.py HOST:PORT synthea FILE N  # N sequential loads of one Synthea bundle
  python3 tools/load/bundles.py HOST:PORT import DIR WORKERS ROUNDS
                                                         # WORKERS clients each posting every bundle of DIR ROUNDS times

A 100-entry transaction: 50 Patients and 50 Observations, each Observation referring to a Patient of
the same bundle by urn:uuid. Responses are requested with Prefer: return=minimal.
"""
import http.client, json, os, sys, threading, time, uuid


def post(conn, body):
    conn.request("POST", "/", body=body, headers={"content-type": "application/fhir+json", "prefer": "return=minimal"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {data[:500]!r}")
    return data


def tx100():
    entries = []
    for i in range(50):
        patient = f"urn:uuid:{uuid.uuid4()}"
        entries.append({"fullUrl": patient, "resource": {"resourceType": "Patient", "name": [{"family": f"Tx{i}"}],
                        "gender": "female", "birthDate": "1970-01-01"}, "request": {"method": "POST", "url": "Patient"}})
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "subject": {"reference": patient},
                        "valueQuantity": {"value": 60 + i, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
                        "request": {"method": "POST", "url": "Observation"}})
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()


def percentiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]
    return f"p50 {pick(0.5)*1000:.1f} ms, p90 {pick(0.9)*1000:.1f} ms, p99 {pick(0.99)*1000:.1f} ms, max {s[-1]*1000:.1f} ms (n={len(s)})"


def main():
    host, port = sys.argv[1].split(":")
    mode = sys.argv[2]
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    if mode == "tx100":
        n = int(sys.argv[3])
        samples = []
        for _ in range(n):
            body = tx100()
            t = time.perf_counter(); post(conn, body); samples.append(time.perf_counter() - t)
        print("100-entry transaction:", percentiles(samples))
    elif mode == "synthea":
        body = open(sys.argv[3], "rb").read()
        entries = len(json.loads(body)["entry"])
        samples = []
        for _ in range(int(sys.argv[4])):
            t = time.perf_counter(); post(conn, body); samples.append(time.perf_counter() - t)
        print(f"{os.path.basename(sys.argv[3])} ({entries} entries, {len(body)/1e6:.1f} MB):", percentiles(samples))
    elif mode == "import":
        directory, workers, rounds = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        bodies = [open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory)) if f.endswith(".json")]
        total = sum(len(json.loads(b)["entry"]) for b in bodies) * workers * rounds
        def work():
            c = http.client.HTTPConnection(host, int(port), timeout=300)
            for _ in range(rounds):
                for body in bodies:
                    post(c, body)
        threads = [threading.Thread(target=work) for _ in range(workers)]
        t = time.perf_counter()
        for th in threads: th.start()
        for th in threads: th.join()
        elapsed = time.perf_counter() - t
        print(f"import: {total} resources in {elapsed:.1f} s = {total/elapsed:.0f} resources/s ({workers} clients)")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
