-- tower-llm-limits RedisLedger: apply a batch of operations to one budget key.
--
-- KEYS[1]  the key's hash (fields: l<i> level, t<i> updated, n<i> learned
--          limit for dimension i = 1 requests, 2 input, 3 output; k marker;
--          co/c1/c2/c3/ce the cross-process claim).
-- ARGV[1]  window in microseconds (capacity = limit * window units)
-- ARGV[2]  idle time to live in milliseconds, after the buckets are full
-- ARGV[3]  this ledger's owner id (for the claim)
-- ARGV[4]  claim grace in microseconds
-- ARGV[5..] operations, each 7 or 8 arguments:
--   S L1 L2 L3 d1 d2 d3            settle (a correction, + charges, - refunds)
--   Y L1 L2 L3 dim limit rem reset  sync (-1 = absent; reset in microseconds)
--   R L1 L2 L3 c1 c2 c3            reserve (last operation only)
--   H L1 L2 L3 c1 c2 c3 h1 h2 h3   reserve c, admitted only if h stays free
--                                  after it (last operation only)
-- L<i> is the configured limit per minute, 0 for none.
--
-- Units: a level counts 1/60,000,000 of a token (one minute in
-- microseconds), so a limit of L per minute refills exactly L units per
-- microsecond; all values are integers (exact in Lua's doubles up to 2^53).
-- Time is the server's TIME, in microseconds.
--
-- Returns {now, kind, a, b, c}: kind 0 no reserve, 1 admitted,
-- 2 wait (a = microseconds, b = dimension), 3 never (a = dimension,
-- b = cost, c = limit).
local key = KEYS[1]
local window = tonumber(ARGV[1])
local idle_ms = tonumber(ARGV[2])
local owner = ARGV[3]
local grace = tonumber(ARGV[4])
local UNIT = 60000000
local TOLERANCE = 500 * UNIT
local RESET_PRECISION = 1000000

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local h = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do
  h[raw[i]] = tonumber(raw[i + 1]) or raw[i + 1]
end
local exists = #raw > 0
local removed = {}
local last_limits = {0, 0, 0}

local function limit_of(i, configured)
  local learned = h['n' .. i]
  if configured > 0 then
    if learned and learned < configured then return learned end
    return configured
  end
  return learned
end

-- Brings bucket i up to now; returns its level.
local function refill(i, limit, cap)
  local updated = h['t' .. i]
  local level = h['l' .. i]
  if not updated or not level then
    h['l' .. i] = cap
    h['t' .. i] = now
    return cap
  end
  if now > updated then
    level = level + (now - updated) * limit
    h['t' .. i] = now
  end
  if level > cap then level = cap end
  h['l' .. i] = level
  return level
end

-- The smallest q with q * d >= n (n, d positive integers).
local function div_ceil(n, d)
  local q = math.floor(n / d)
  while q * d < n do q = q + 1 end
  while q > 0 and (q - 1) * d >= n do q = q - 1 end
  return q
end

local function clear_claim()
  for _, f in ipairs({'co', 'c1', 'c2', 'c3', 'ce'}) do
    if h[f] ~= nil then
      h[f] = nil
      table.insert(removed, f)
    end
  end
end

local function settle(limits, delta)
  if not exists then return end
  for i = 1, 3 do
    if delta[i] ~= 0 then
      local limit = limit_of(i, limits[i])
      if limit then
        local cap = limit * window
        local amount = delta[i] * UNIT
        local level = refill(i, limit, cap) - amount
        if amount < 0 and level > cap then level = cap end
        h['l' .. i] = level
      end
    end
  end
end

local function sync(limits, i, reported, remaining, reset)
  exists = true
  h.k = 1
  if reported > 0 then h['n' .. i] = reported end
  local limit = limit_of(i, limits[i])
  if not limit then return end
  local cap = limit * window
  local level = refill(i, limit, cap)
  local server, tolerance
  if remaining >= 0 then
    server = remaining * UNIT
    tolerance = 0
    if i ~= 1 and remaining % 1000 == 0 then tolerance = TOLERANCE end
  elseif reset >= 0 then
    server = cap - reset * limit
    if server < 0 then server = 0 end
    tolerance = RESET_PRECISION * limit
  else
    return
  end
  if level > server + tolerance then h['l' .. i] = server end
end

local function reserve(limits, costs, headroom)
  exists = true
  h.k = 1
  local claim = h.co ~= nil and h.co ~= owner and (h.ce or 0) > now
  if h.co ~= nil and not claim and h.co ~= owner then clear_claim() end
  local wait, dim = nil, 0
  for i = 1, 3 do
    local limit = limit_of(i, limits[i])
    if limit then
      local cap = limit * window
      local level = refill(i, limit, cap)
      local cost = costs[i]
      if cost > 0 then
        cost = cost + headroom[i]
        if cost > limit then return {3, i, cost, limit} end
        local needed = math.min(cost * UNIT, cap)
        if claim then needed = needed + math.min((h['c' .. i] or 0) * UNIT, cap) end
        if level < needed then
          local from = math.max(h['t' .. i], now) - now
          local w = from + div_ceil(needed - level, limit)
          if wait == nil or w > wait then wait, dim = w, i end
        end
      end
    end
  end
  if wait ~= nil then
    if not claim then
      h.co = owner
      h.c1, h.c2, h.c3 = costs[1] + headroom[1], costs[2] + headroom[2], costs[3] + headroom[3]
      h.ce = now + wait + grace
    end
    return {2, wait, dim, 0}
  end
  for i = 1, 3 do
    if limit_of(i, limits[i]) then
      h['l' .. i] = h['l' .. i] - costs[i] * UNIT
    end
  end
  if h.co == owner then clear_claim() end
  return {1, 0, 0, 0}
end

local answer = {0, 0, 0, 0}
local n = 5
while n <= #ARGV do
  local op = ARGV[n]
  local limits = {tonumber(ARGV[n + 1]), tonumber(ARGV[n + 2]), tonumber(ARGV[n + 3])}
  last_limits = limits
  if op == 'S' then
    settle(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6])})
    n = n + 7
  elseif op == 'Y' then
    sync(limits, tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6]),
      tonumber(ARGV[n + 7]))
    n = n + 8
  elseif op == 'R' then
    answer = reserve(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6])},
      {0, 0, 0})
    n = n + 7
  elseif op == 'H' then
    answer = reserve(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6])},
      {tonumber(ARGV[n + 7]), tonumber(ARGV[n + 8]), tonumber(ARGV[n + 9])})
    n = n + 10
  else
    return redis.error_reply('tower-llm-limits: unknown ledger operation ' .. tostring(op))
  end
end

if exists then
  local fields = {}
  local full_us = 0
  for f, v in pairs(h) do
    table.insert(fields, f)
    if type(v) == 'number' then
      table.insert(fields, string.format('%.0f', v))
    else
      table.insert(fields, v)
    end
  end
  if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
  if #removed > 0 then redis.call('HDEL', key, unpack(removed)) end
  for i = 1, 3 do
    local limit = limit_of(i, last_limits[i])
    if limit and h['l' .. i] then
      local missing = limit * window - h['l' .. i]
      if missing > 0 then
        full_us = math.max(full_us, div_ceil(missing, limit))
      end
    end
  end
  redis.call('PEXPIRE', key, math.floor(full_us / 1000) + 1 + idle_ms)
end
return {now, answer[1], answer[2], answer[3], answer[4]}
