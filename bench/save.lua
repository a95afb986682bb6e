-- wrk script: POST /save as JSON, spread over SLUGS slugs named PREFIX-0, PREFIX-1, ...
local slugs = tonumber(os.getenv("SLUGS") or "1")
local prefix = os.getenv("PREFIX") or "bench"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local slug = prefix .. "-" .. (counter % slugs)
  return wrk.format(nil, "/save", nil, '{"slug":"' .. slug .. '","html":"<p>bench</p>","data":{"n":' .. counter .. '}}')
end
