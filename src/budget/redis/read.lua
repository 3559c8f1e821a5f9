-- tower-llm-limits RedisLedger: the state of one budget key, read-only.
--
-- KEYS[1] the key's hash (see apply.lua); ARGV[1] window in microseconds;
-- ARGV[2..4] configured limits (0 for none).
-- Returns {now, exists, then per dimension: limit (-1 none), learned (0/1),
-- level (units of 1/60,000,000 token, refilled to now), capacity}.
local window = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local raw = redis.call('HGETALL', KEYS[1])
if #raw == 0 then return {now, 0} end
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = tonumber(raw[i + 1]) or raw[i + 1] end
local out = {now, 1}
for i = 1, 3 do
  local configured = tonumber(ARGV[i + 1])
  local learned = h['n' .. i]
  local limit, is_learned = nil, 0
  if configured > 0 then
    limit = configured
    if learned and learned < configured then limit, is_learned = learned, 1 end
  elseif learned then
    limit, is_learned = learned, 1
  end
  if limit then
    local cap = limit * window
    local level = cap
    if h['t' .. i] and h['l' .. i] then
      level = h['l' .. i] + math.max(0, now - h['t' .. i]) * limit
      if level > cap then level = cap end
    end
    table.insert(out, limit)
    table.insert(out, is_learned)
    table.insert(out, level)
    table.insert(out, cap)
  else
    table.insert(out, -1)
    table.insert(out, 0)
    table.insert(out, 0)
    table.insert(out, 0)
  end
end
return out
