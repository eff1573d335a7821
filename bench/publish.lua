-- wrk script: POST one event with a ~128-byte payload per request.
--   wrk -t2 -c32 -d10s -s bench/publish.lua http://127.0.0.1:2021/
-- The server must declare the namespace `bench`.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"subject":"bench.wrk","payload":{"fill":"' .. string.rep("x", 110) .. '"}}'

done = function(summary, latency, requests)
  -- wrk counts answers of 400 and above here; every other answer is the 202 of a stored event.
  io.write(string.format("error answers: %d\n", summary.errors.status))
  io.write(string.format("p50 %.2f ms  p99 %.2f ms  p99.9 %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
