-- wrk script: POST /save as JSON; SLUGS=1 saves one slug, more spreads saves over that many.
local slugs = tonumber(os.getenv("SLUGS") or "1")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local slug = "bench-" .. (counter % slugs)
  return wrk.format(nil, "/save", nil, '{"slug":"' .. slug .. '","html":"<p>bench</p>","data":{"n":' .. counter .. '}}')
end
