-- wrk script for bench/gateway.py: POST one chat body and print parseable results.
-- The body comes from BENCH_BODY so the Python client and wrk send the same bytes.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- An API key for runs with key limits on (bench/gateway.py --limits).
if os.getenv("BENCH_AUTH") then wrk.headers["Authorization"] = os.getenv("BENCH_AUTH") end
wrk.body = os.getenv("BENCH_BODY") or '{"model":"auto","messages":[{"role":"user","content":"hi"}]}'

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d bytes=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f"
         .. " mean_us=%.0f connect=%d read=%d write=%d status=%d timeout=%d\n",
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
