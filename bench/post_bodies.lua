-- wrk script for bench/serve_bench.py: POSTs JSON bodies read from a file (one body per line),
-- cycling through them, and counts responses outside 2xx.
--
--   wrk -s bench/post_bodies.lua http://127.0.0.1:PORT -- BODIES_FILE /predict
--
-- At the end it prints one line "WRK_JSON {...}" with the totals, latency percentiles in
-- microseconds (wrk's own HdrHistogram-style stats) and the non-2xx count summed over threads.

local bodies = {}
local path = "/"
local idx = 0
non2xx = 0 -- global: read per thread in done() through thread:get()

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file = args[1]
  path = args[2] or "/"
  if not file then
    error("usage: wrk -s post_bodies.lua URL -- BODIES_FILE PATH")
  end
  for line in io.lines(file) do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  if #bodies == 0 then
    error("no bodies in " .. file)
  end
  -- each thread (and each run) starts at a different place in the list
  idx = ((thread_index or 0) * 7919) % #bodies
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  idx = idx % #bodies + 1
  return wrk.format("POST", path, nil, bodies[idx])
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"non2xx":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f,"stdev_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bad, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, latency.stdev))
end
