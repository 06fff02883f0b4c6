-- wrk script for bench/serve_bench.py: POSTs JSON bodies read from a file (one body per line),
-- cycling through them, and counts responses outside 2xx.
--
--   wrk -s bench/post_bodies.lua http://127.0.0.1:PORT -- BODIES_FILE /predict [CREDENTIAL_FILE]
--
-- CREDENTIAL_FILE (optional) holds a token on its first line: every request then carries
-- "Authorization: Bearer <token>" (read from a file so that the token is not on wrk's command line,
-- which every user of the machine can read).
--
-- At the end it prints one line "WRK_JSON {...}" with the totals, latency percentiles in
-- microseconds (wrk's own HdrHistogram-style stats), the non-2xx count summed over threads and,
-- of those, the 401/403 answers ("denied": the credential was refused).

local bodies = {}
local path = "/"
local idx = 0
non2xx = 0 -- global: read per thread in done() through thread:get()
denied = 0 -- likewise: 401 and 403 answers (also counted in non2xx)

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
  if args[3] then
    local f = assert(io.open(args[3], "r"))
    local token = f:read("*l")
    f:close()
    if not token or #token == 0 then
      error("no token in " .. args[3])
    end
    wrk.headers["Authorization"] = "Bearer " .. token
  end
end

function request()
  idx = idx % #bodies + 1
  return wrk.format("POST", path, nil, bodies[idx])
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if status == 401 or status == 403 then
      denied = denied + 1
    end
  end
end

function done(summary, latency, requests)
  local bad, refused = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    refused = refused + (t:get("denied") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"non2xx":%d,"denied":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f,"stdev_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bad, refused, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, latency.stdev))
end
