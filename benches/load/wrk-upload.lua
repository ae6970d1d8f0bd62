-- wrk script for the bodies scenario's uploads: every request is a POST with
-- a body of BODY_BYTES (environment, default 1 MiB). The body is built once;
-- with no request() hook wrk sends the same prepared request each time.
local n = tonumber(os.getenv("BODY_BYTES") or "1048576")
wrk.method = "POST"
wrk.body = string.rep("x", n)
wrk.headers["Content-Type"] = "application/octet-stream"
