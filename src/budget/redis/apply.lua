-- tower-llm-limits RedisLedger: apply a batch of operations to one budget key.
--
-- KEYS[1]  the key's hash (fields: l<i> level, t<i> updated, n<i> learned
--          limit for dimension i = 1 requests, 2 input, 3 output; k marker;
--          co/c1/c2/c3/ce the cross-process claim; q<owner> a ticket of the
--          fleet's line: "request,since,seq,c1,c2,c3,due,expires,delayed";
--          os the position of the key's newest output sample).
-- KEYS[2]  the key's output samples (list, newest last, at most 256:
--          "owner,output,max_tokens"), for the fleet's learned output
-- ARGV[1]  window in microseconds (capacity = limit * window units)
-- ARGV[2]  idle time to live in milliseconds, after the buckets are full
-- ARGV[3]  this ledger's owner id (for the claim)
-- KEYS[3], KEYS[4], KEYS[5]  with a shared prompt cache: the prompt-cache
--          markers (hash: prefix name -> Redis time it is cached until;
--          's' .. prefix name -> its size as the server counted it, in
--          tokens, when the writer's answer said),
--          their log (sorted set: prefix name by version), and the
--          prefixes being written (hash: prefix name -> "until,owner", the
--          Redis time the marker expires and the writer's ledger)
-- KEYS[6]  with a shared prompt cache: the prefixes queued requests will
--          write (hash: prefix name -> "until,owner,tokens", the Redis time
--          the marker expires, the ledger, the tokens of the queued
--          request's longest write)
-- ARGV[4]  claim grace in microseconds
-- ARGV[5]  the marker version this ledger saw last, -1 for no shared
--          prompt cache
-- ARGV[6]  the position of the output sample this ledger saw last
-- ARGV[7..] operations, each 7 to 10 arguments (C: 2 + 2n, W: 1 + n,
-- P: 7 + n + m + k + g, U: 3 + n, D: 1 + n, O: 2):
--   O output max_tokens            an answer's output, added to the samples
--   C for n name1 size1..namen sizen
--                                  prefixes cached, for `for` microseconds
--                                  (no longer being written), each with its
--                                  size as the server counted it (0: not
--                                  known; a known size is kept)
--   W n name1..namen               prefixes this ledger no longer writes
--                                  (the answer began, or ended without)
--   P for hold tokens qfor n w1..wn m p1..pm k r1..rk grace g s1..sg
--                                  the next Q's prefixes: if admitted, it
--                                  writes w1..wn (marked for `for`
--                                  microseconds); it is not admitted while
--                                  another ledger writes one of p1..pm, or
--                                  while another ledger's queued request
--                                  whose longest write is below `tokens`
--                                  will write one of them that is not among
--                                  w1..wn (a head held keeps its ticket for
--                                  `hold` microseconds plus the grace); if
--                                  answered a wait, w1..wn are marked as
--                                  queued for `qfor` microseconds (0: not),
--                                  or for its wait plus the grace when that
--                                  is longer, and this ledger's markers of
--                                  r1..rk (its other queued requests')
--                                  renewed for that wait plus the grace;
--                                  at its first ask (grace > 0), if it
--                                  would be admitted now while one of
--                                  s1..sg (shorter prefixes of it) has no
--                                  marker (written, queued or cached by
--                                  any ledger), it is answered a wait of
--                                  `grace` microseconds instead (nothing
--                                  debited, a head's ticket kept with its
--                                  costs, w1..wn marked as queued)
--   U for tokens n name1..namen    prefixes a queued request of this ledger
--                                  will write (longest `tokens`), for `for`
--   D n name1..namen               prefixes no longer queued here
--   S L1 L2 L3 d1 d2 d3            settle (a correction, + charges, - refunds)
--   Y L1 L2 L3 dim limit rem reset age  sync (-1 = absent; reset in
--                                  microseconds; age: microseconds since
--                                  the answer's headers were read, less
--                                  100 ms, the server's refill since)
--   R L1 L2 L3 c1 c2 c3            reserve (last operation only)
--   H L1 L2 L3 c1 c2 c3 h1 h2 h3   reserve c, admitted only if h stays free
--                                  after it (last operation only)
--   Q L1 L2 L3 c1 c2 c3 h1 h2 h3 owner head request waited
--                                  H in the fleet's line (last operation
--                                  only): owner a budget's id, head 1 for
--                                  the head of its line, request its id in
--                                  the budget, waited in microseconds (see
--                                  `reserve_line`)
-- L<i> is the configured limit per minute, 0 for none.
--
-- Units: a level counts 1/60,000,000 of a token (one minute in
-- microseconds), so a limit of L per minute refills exactly L units per
-- microsecond; all values are integers (exact in Lua's doubles up to 2^53).
-- Time is the server's TIME, in microseconds.
--
-- Returns {now, kind, a, b, c}: kind 0 no reserve, 1 admitted,
-- 2 wait (a = microseconds, b = dimension, c = the name of a pending
-- prefix another ledger writes, negative when that writer is a queued
-- request, 0 for none), 3 never (a = dimension,
-- b = cost, c = limit); then {position, m, output1, max_tokens1, ...}:
-- the output samples of other ledgers after ARGV[6] (at most 256), and
-- the position of the newest; with a shared prompt cache, then {version, n,
-- name1, cached1, writing1, size1, ...}: the markers after ARGV[5] (at
-- most 64), each with the Redis time it is cached until, the time its
-- marker of being written by another ledger expires (0: none; negated for
-- a queued request's marker) and its size as the server counted it (0:
-- not known), and the newest
-- version among them.
local key = KEYS[1]
local window = tonumber(ARGV[1])
local idle_ms = tonumber(ARGV[2])
local owner = ARGV[3]
local grace = tonumber(ARGV[4])
local since = tonumber(ARGV[5])
local outs_after = tonumber(ARGV[6])
local outs = KEYS[2]
local marks, log, writing, queued = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local OUTPUTS_KEPT = 256
local MAX_MARKS = 4096
local MARKS_PER_REPLY = 64
local UNIT = 60000000
local TOLERANCE = 500 * UNIT
local RESET_PRECISION = 1000000
local PREFIX_WAIT = 1000 -- microseconds: `PREFIX_WRITING_WAIT`
local intent_writes, intent_pending, intent_for, intent_hold = {}, {}, 0, 0
local intent_tokens, intent_queued, intent_renew = 0, 0, {}
local intent_grace, intent_shorter = 0, {}

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

local function sync(limits, i, reported, remaining, reset, age)
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
  -- The server's bucket has refilled since its headers were read.
  if age > window then age = window end
  server = server + age * limit
  if server > cap then server = cap end
  if level > server + tolerance then h['l' .. i] = server end
end

-- Whether costs fit now: {1} fits, {2, wait, dim} waits, {3, dim, cost,
-- limit} never (brings the buckets up to now). `extra` (optional), per
-- dimension with a cost, is needed beside it (a claim's costs), each part
-- at most the bucket's capacity.
local function check(limits, costs, extra)
  local wait, dim = nil, 0
  for i = 1, 3 do
    local limit = limit_of(i, limits[i])
    if limit then
      local cap = limit * window
      local level = refill(i, limit, cap)
      local cost = costs[i]
      if cost > 0 then
        if cost > limit then return {3, i, cost, limit} end
        local needed = math.min(cost * UNIT, cap)
        if extra then needed = needed + math.min(extra[i] * UNIT, cap) end
        if level < needed then
          local from = math.max(h['t' .. i], now) - now
          local w = from + div_ceil(needed - level, limit)
          if wait == nil or w > wait then wait, dim = w, i end
        end
      end
    end
  end
  if wait ~= nil then return {2, wait, dim, 0} end
  return {1, 0, 0, 0}
end

local function debit(limits, costs)
  for i = 1, 3 do
    if limit_of(i, limits[i]) then
      h['l' .. i] = h['l' .. i] - costs[i] * UNIT
    end
  end
end

local function reserve(limits, costs, headroom)
  exists = true
  h.k = 1
  local claim = h.co ~= nil and h.co ~= owner and (h.ce or 0) > now
  if h.co ~= nil and not claim and h.co ~= owner then clear_claim() end
  -- The headroom is kept in a dimension only where the request costs something.
  local with = {0, 0, 0}
  for i = 1, 3 do
    if costs[i] > 0 then with[i] = costs[i] + headroom[i] end
  end
  local claimed = nil
  if claim then claimed = {h.c1 or 0, h.c2 or 0, h.c3 or 0} end
  local answer = check(limits, with, claimed)
  if answer[1] == 3 then return answer end
  if answer[1] == 2 then
    if not claim then
      h.co = owner
      h.c1, h.c2, h.c3 = costs[1] + headroom[1], costs[2] + headroom[2], costs[3] + headroom[3]
      h.ce = now + answer[2] + grace
    end
    return answer
  end
  debit(limits, costs)
  if h.co == owner then clear_claim() end
  return {1, 0, 0, 0}
end
-- The fleet's line (`Ledger::reserve_in_line`, the same rule as the
-- in-memory ledger's): a ticket per budget's refused head, in order of
-- arrival (since), then of first refusal (seq). A request of another owner
-- that arrived after the oldest ticket is admitted if it fits beside the
-- ticket's costs, or if it fits and its refill time keeps what passing
-- requests delayed the ticket within LINE_BOUND; otherwise it waits to fit
-- after the ticket.
local LINE_BOUND = 2000000 -- microseconds: the budget's head-of-line bound

-- The refill time of costs in the tightest dimension with a limit.
local function refill_us(limits, costs)
  local t = 0
  for i = 1, 3 do
    local limit = limit_of(i, limits[i])
    if limit and costs[i] > 0 then
      local w = div_ceil(costs[i] * UNIT, limit)
      if w > t then t = w end
    end
  end
  return t
end

local function tickets()
  local list = {}
  for f, v in pairs(h) do
    if type(v) == 'string' and string.sub(f, 1, 1) == 'q' then
      local t = {}
      for x in string.gmatch(v, '[^,]+') do t[#t + 1] = tonumber(x) end
      if #t == 9 then
        list[#list + 1] = {owner = string.sub(f, 2), request = t[1], since = t[2], seq = t[3],
          c = {t[4], t[5], t[6]}, due = t[7], expires = t[8], delayed = t[9]}
      end
    end
  end
  return list
end

local function drop_field(f)
  if h[f] ~= nil then
    h[f] = nil
    table.insert(removed, f)
  end
end

local function write_ticket(t)
  local f = 'q' .. t.owner
  for j = #removed, 1, -1 do
    if removed[j] == f then table.remove(removed, j) end
  end
  h[f] = string.format('%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f', t.request, t.since,
    t.seq, t.c[1], t.c[2], t.c[3], t.due, t.expires, t.delayed)
end

-- A wait behind t (another owner's older ticket) ends, at the latest,
-- RECHECK after its due, when its head asks again and the line moves; for
-- a ticket with costs whose head is late, after as long again as it is
-- late (at least RECHECK). A ticket held for a prefix's writer has no
-- costs: the wait stands (`until_line_moves` in the in-memory ledger).
local RECHECK = 20000 -- microseconds: `LINE_RECHECK`
local function until_line_moves(answer, t)
  if answer[1] ~= 2 then return answer end
  local moves
  if t.due > now then
    moves = t.due - now + RECHECK
  elseif t.c[1] + t.c[2] + t.c[3] > 0 then
    moves = math.max(now - t.due, RECHECK)
  else
    return answer
  end
  if moves < answer[2] then return {2, moves, answer[3], answer[4]} end
  return answer
end

local function before(a, since, seq)
  return a.since < since or (a.since == since and a.seq < seq)
end

-- The name of the first of `names` another ledger is writing, or nil.
local function written_elsewhere(names)
  if since < 0 then return nil end
  for _, name in ipairs(names) do
    local v = redis.call('HGET', writing, name)
    if v then
      local w_until, w_owner = string.match(v, '^(%d+),(.+)$')
      if w_owner ~= owner and tonumber(w_until) > now then return name end
    end
  end
  return nil
end

-- The name of the first of `names`, not among this request's own writes,
-- that another ledger's queued request will write, its longest write
-- shorter than this request's: nested prefixes are written shortest first
-- (the longer then reads the shorter), and the strict order keeps two
-- requests from holding for each other.
local function queued_elsewhere(names)
  if since < 0 or intent_tokens <= 0 then return nil end
  local own = {}
  for _, name in ipairs(intent_writes) do own[name] = true end
  for _, name in ipairs(names) do
    if not own[name] then
      local v = redis.call('HGET', queued, name)
      if v then
        local q_until, q_owner, q_tokens = string.match(v, '^(%d+),(.+),(%d+)$')
        if q_owner ~= owner and tonumber(q_until) > now and tonumber(q_tokens) < intent_tokens then
          return name
        end
      end
    end
  end
  return nil
end

-- Whether one of `names` has no marker at all: no ledger writes it, none
-- will from its queue, and it is not known cached (the writer grace: a
-- shorter request of another ledger may be about to mark it).
local function unmarked(names)
  if since < 0 then return false end
  for _, name in ipairs(names) do
    local found = false
    local w = redis.call('HGET', writing, name)
    if w then
      local w_until = string.match(w, '^(%d+),')
      found = tonumber(w_until) > now
    end
    if not found then
      local q = redis.call('HGET', queued, name)
      if q then
        local q_until = string.match(q, '^(%d+),')
        found = tonumber(q_until) > now
      end
    end
    if not found then
      local c = tonumber(redis.call('HGET', marks, name) or 0)
      found = c > now
    end
    if not found then return true end
  end
  return false
end

-- The newest marker version (0 for none).
local function newest()
  local top = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
  if #top == 0 then return 0 end
  return tonumber(top[2])
end

local function reserve_line(limits, costs, headroom, owner, head, request, waited)
  exists = true
  h.k = 1
  -- A request that would go now while another ledger writes one of its
  -- prefixes, or will write a shorter one of them from its queue, is held
  -- for that writer's answer: nothing debited, the line as it was, a
  -- head's ticket kept for the hold (its date and place, no costs: the
  -- others use the refill meanwhile); one that waits anyway asks again
  -- after its wait.
  local busy = written_elsewhere(intent_pending)
  local queued_busy = false
  if busy == nil then
    busy = queued_elsewhere(intent_pending)
    queued_busy = busy ~= nil
  end
  -- The writer grace: at its first ask, a writer with a shorter prefix
  -- no ledger marked waits for a shorter writer that arrived with it.
  local graced = busy == nil and intent_grace > 0 and #intent_shorter > 0 and
    unmarked(intent_shorter)
  local saved, saved_removed = nil, 0
  if busy ~= nil or graced then
    saved = {}
    for f, v in pairs(h) do saved[f] = v end
    saved_removed = #removed
  end
  local with = {costs[1] + headroom[1], costs[2] + headroom[2], costs[3] + headroom[3]}
  local live = {}
  local mine = nil
  local next_seq = 0
  for _, t in ipairs(tickets()) do
    if t.expires <= now then
      drop_field('q' .. t.owner)
    else
      live[#live + 1] = t
      if t.seq + 1 > next_seq then next_seq = t.seq + 1 end
      if t.owner == owner then mine = t end
    end
  end
  -- A head asking again keeps its date; a new one is dated by its wait.
  local same = mine ~= nil and mine.request == request
  local since = now - waited
  if same then since = mine.since end
  local myseq = math.huge
  if same then myseq = mine.seq end
  local oldest = nil
  for _, t in ipairs(live) do
    if t.owner ~= owner and before(t, since, myseq) then
      if oldest == nil or before(t, oldest.since, oldest.seq) then oldest = t end
    end
  end
  local answer
  if oldest == nil then
    answer = check(limits, with)
    if answer[1] == 1 then debit(limits, costs) end
  else
    local c = oldest.c
    local beside = check(limits, {with[1] + c[1], with[2] + c[2], with[3] + c[3]})
    if beside[1] == 1 then
      debit(limits, costs)
      answer = {1, 0, 0, 0}
    else
      local delay = refill_us(limits, costs)
      local passes = oldest.delayed + delay <= LINE_BOUND
      local alone = beside
      if passes then alone = check(limits, with) end
      if passes and alone[1] == 1 then
        debit(limits, costs)
        oldest.delayed = oldest.delayed + delay
        write_ticket(oldest)
        answer = {1, 0, 0, 0}
      elseif passes and alone[1] == 3 then
        answer = alone
      elseif beside[1] == 2 then
        answer = beside
      else
        local d, limit = beside[2], beside[4]
        if with[d] > limit then
          answer = {3, d, with[d], limit}
        else
          -- Never beside it: after it.
          local after = math.max(oldest.due - now, 0) + refill_us(limits, with)
          if after < 1000 then after = 1000 end
          answer = {2, after, d, 0}
        end
      end
    end
    answer = until_line_moves(answer, oldest)
  end
  if busy ~= nil and answer[1] == 1 then
    h = saved
    while #removed > saved_removed do table.remove(removed) end
    if head then
      local seq, delayed = next_seq, 0
      if same then seq, delayed = mine.seq, mine.delayed end
      -- Its place and date, no costs: the others use the refill meanwhile.
      write_ticket({owner = owner, request = request, since = since, seq = seq, c = {0, 0, 0},
        due = now, expires = now + intent_hold + grace, delayed = delayed})
    end
    if queued_busy then
      -- Logged anew, so that this reply's markers carry the queued
      -- marker and its expiry: the held request holds while it lives.
      redis.call('ZADD', log, newest() + 1, busy)
      return {2, PREFIX_WAIT, 2, -tonumber(busy)}
    end
    return {2, PREFIX_WAIT, 2, tonumber(busy)}
  end
  if graced and answer[1] == 1 then
    h = saved
    while #removed > saved_removed do table.remove(removed) end
    if head then
      -- Its place, and its costs due at the grace's end: the others do not
      -- take its share of the refill meanwhile.
      local seq, delayed = next_seq, 0
      if same then seq, delayed = mine.seq, mine.delayed end
      write_ticket({owner = owner, request = request, since = since, seq = seq, c = with,
        due = now + intent_grace, expires = now + intent_grace + grace, delayed = delayed})
    end
    return {2, intent_grace, 2, 0}
  end
  if head then
    if answer[1] == 2 then
      local seq, delayed = next_seq, 0
      if same then seq, delayed = mine.seq, mine.delayed end
      local due = now + answer[2]
      write_ticket({owner = owner, request = request, since = since, seq = seq, c = with,
        due = due, expires = due + grace, delayed = delayed})
    elseif mine ~= nil then
      drop_field('q' .. owner)
    end
  end
  return answer
end

-- Keeps the marker keys at least `for_us` plus the idle time.
local function keep_marks(for_us)
  local keep = math.floor(for_us / 1000) + idle_ms
  for _, k in ipairs({marks, log, writing, queued}) do
    if redis.call('PTTL', k) < keep then
      redis.call('PEXPIRE', k, keep)
    end
  end
end

-- Marks names as being written by this ledger for `for_us`.
local function mark_writing(for_us, names)
  if since < 0 or #names == 0 then return end
  local v = newest()
  local value = string.format('%.0f', now + for_us) .. ',' .. owner
  for _, name in ipairs(names) do
    v = v + 1
    redis.call('HSET', writing, name, value)
    redis.call('ZADD', log, v, name)
  end
  keep_marks(for_us)
end

-- Marks names as queued by this ledger for `for_us` (a request whose
-- longest write is `tokens`); a new marker is logged.
local function mark_queued(for_us, tokens, names)
  if since < 0 or #names == 0 or for_us <= 0 then return end
  local v = newest()
  local value = string.format('%.0f', now + for_us) .. ',' .. owner .. ',' ..
    string.format('%.0f', tokens)
  for _, name in ipairs(names) do
    local old = redis.call('HGET', queued, name)
    local o_owner = nil
    if old then o_owner = string.match(old, '^%d+,(.+),%d+$') end
    redis.call('HSET', queued, name, value)
    -- A marker renewed is logged too: the requests of other ledgers that
    -- hold for it learn its new expiry.
    if o_owner ~= owner or old ~= value then
      v = v + 1
      redis.call('ZADD', log, v, name)
    end
  end
  keep_marks(for_us)
end

-- Renews this ledger's queued markers of names to last at least `for_us`
-- more (keeping their tokens); each renewal is logged.
local function renew_queued(for_us, names)
  if since < 0 then return end
  local v = newest()
  for _, name in ipairs(names) do
    local old = redis.call('HGET', queued, name)
    if old then
      local o_until, o_owner, o_tokens = string.match(old, '^(%d+),(.+),(%d+)$')
      if o_owner == owner and tonumber(o_until) < now + for_us then
        redis.call('HSET', queued, name,
          string.format('%.0f', now + for_us) .. ',' .. owner .. ',' .. o_tokens)
        v = v + 1
        redis.call('ZADD', log, v, name)
      end
    end
  end
  keep_marks(for_us)
end

-- Clears this ledger's markers of names in the hash marks, whose values
-- give their owner by the capture of pattern, and logs each change.
local function clear_own(marks, pattern, names)
  if since < 0 then return end
  local v = newest()
  for _, name in ipairs(names) do
    local m = redis.call('HGET', marks, name)
    if m and string.match(m, pattern) == owner then
      redis.call('HDEL', marks, name)
      v = v + 1
      redis.call('ZADD', log, v, name)
    end
  end
end

-- Clears this ledger's queued markers of names.
local function unqueue(names)
  clear_own(queued, '^%d+,(.+),%d+$', names)
end

-- Clears this ledger's being-written markers of names.
local function written(names)
  clear_own(writing, '^%d+,(.+)$', names)
end

local function cached(for_us, names, sizes)
  if since < 0 then return end
  local v = newest()
  local until_us = string.format('%.0f', now + for_us)
  for i, name in ipairs(names) do
    v = v + 1
    redis.call('HSET', marks, name, until_us)
    -- A prefix's size is the same whoever wrote it: a known one is kept.
    if tonumber(sizes[i]) > 0 then redis.call('HSET', marks, 's' .. name, sizes[i]) end
    redis.call('HDEL', writing, name)
    redis.call('ZADD', log, v, name)
  end
  local count = redis.call('ZCARD', log)
  if count > MAX_MARKS then
    local old = redis.call('ZRANGE', log, 0, count - MAX_MARKS - 1)
    redis.call('HDEL', marks, unpack(old))
    local old_sizes = {}
    for i, name in ipairs(old) do old_sizes[i] = 's' .. name end
    redis.call('HDEL', marks, unpack(old_sizes))
    redis.call('HDEL', writing, unpack(old))
    redis.call('HDEL', queued, unpack(old))
    redis.call('ZREMRANGEBYRANK', log, 0, count - MAX_MARKS - 1)
  end
  keep_marks(for_us)
end

-- The markers recorded after version `since`: {version, n, name, until...}.
local function markers()
  local after = since
  if after > newest() then after = 0 end
  local got = redis.call('ZRANGEBYSCORE', log, '(' .. string.format('%.0f', after), '+inf',
    'WITHSCORES', 'LIMIT', 0, MARKS_PER_REPLY)
  local out = {after, 0}
  for i = 1, #got, 2 do
    out[1] = tonumber(got[i + 1])
    local until_us = tonumber(redis.call('HGET', marks, got[i]) or 0)
    local w_until = 0
    local w = redis.call('HGET', writing, got[i])
    if w then
      local u, o = string.match(w, '^(%d+),(.+)$')
      if o ~= owner then w_until = tonumber(u) end
    end
    -- A queued request's marker counts as a write to come, told apart
    -- by its sign (negative: queued, not yet admitted).
    local q = redis.call('HGET', queued, got[i])
    if q and w_until <= now then
      local u, o = string.match(q, '^(%d+),(.+),%d+$')
      if o ~= owner and tonumber(u) > now then w_until = -tonumber(u) end
    end
    table.insert(out, tonumber(got[i]))
    table.insert(out, until_us)
    table.insert(out, w_until)
    table.insert(out, tonumber(redis.call('HGET', marks, 's' .. got[i]) or 0))
    out[2] = out[2] + 1
  end
  return out
end

-- The count arguments after ARGV[at], as a list.
local function names_after(at, count)
  local names = {}
  for i = 1, count do names[i] = ARGV[at + i] end
  return names
end

-- Adds an answer's output to the key's samples (as the digits given).
local function output(tokens, max_tokens)
  local pos = (h['os'] or 0) + 1
  h['os'] = pos
  exists = true
  redis.call('RPUSH', outs, owner .. ',' .. tokens .. ',' .. max_tokens)
  redis.call('LTRIM', outs, -OUTPUTS_KEPT, -1)
end

-- The output samples of other ledgers after `outs_after`, oldest first:
-- {position, m, output1, max_tokens1, ...}.
local function outputs()
  local pos = h['os'] or 0
  local after = outs_after
  -- A position past the newest: the key expired since; all are new.
  if after > pos then after = 0 end
  local new = math.min(pos - after, OUTPUTS_KEPT)
  local reply = {pos, 0}
  if new <= 0 then return reply end
  for _, e in ipairs(redis.call('LRANGE', outs, -new, -1)) do
    local who, tokens, max_tokens = string.match(e, '^([^,]*),(%d+),(%d+)$')
    if who and who ~= owner then
      table.insert(reply, tonumber(tokens))
      table.insert(reply, tonumber(max_tokens))
      reply[2] = reply[2] + 1
    end
  end
  return reply
end

local answer = {0, 0, 0, 0}
local n = 7
while n <= #ARGV do
  local op = ARGV[n]
  if op == 'C' then
    local count = tonumber(ARGV[n + 2])
    local names, sizes = {}, {}
    for i = 1, count do
      names[i] = ARGV[n + 1 + 2 * i]
      sizes[i] = ARGV[n + 2 + 2 * i]
    end
    cached(tonumber(ARGV[n + 1]), names, sizes)
    n = n + 3 + 2 * count
  elseif op == 'W' then
    local count = tonumber(ARGV[n + 1])
    written(names_after(n + 1, count))
    n = n + 2 + count
  elseif op == 'P' then
    intent_for = tonumber(ARGV[n + 1])
    intent_hold = tonumber(ARGV[n + 2])
    intent_tokens = tonumber(ARGV[n + 3])
    intent_queued = tonumber(ARGV[n + 4])
    local nw = tonumber(ARGV[n + 5])
    intent_writes = names_after(n + 5, nw)
    local np = tonumber(ARGV[n + 6 + nw])
    intent_pending = names_after(n + 6 + nw, np)
    local nr = tonumber(ARGV[n + 7 + nw + np])
    intent_renew = names_after(n + 7 + nw + np, nr)
    intent_grace = tonumber(ARGV[n + 8 + nw + np + nr])
    local ns = tonumber(ARGV[n + 9 + nw + np + nr])
    intent_shorter = names_after(n + 9 + nw + np + nr, ns)
    n = n + 10 + nw + np + nr + ns
  elseif op == 'U' then
    local count = tonumber(ARGV[n + 3])
    mark_queued(tonumber(ARGV[n + 1]), tonumber(ARGV[n + 2]), names_after(n + 3, count))
    n = n + 4 + count
  elseif op == 'D' then
    local count = tonumber(ARGV[n + 1])
    unqueue(names_after(n + 1, count))
    n = n + 2 + count
  elseif op == 'O' then
    output(ARGV[n + 1], ARGV[n + 2])
    n = n + 3
  else
    local limits = {tonumber(ARGV[n + 1]), tonumber(ARGV[n + 2]), tonumber(ARGV[n + 3])}
    last_limits = limits
    if op == 'S' then
      settle(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6])})
      n = n + 7
    elseif op == 'Y' then
      sync(limits, tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]), tonumber(ARGV[n + 6]),
        tonumber(ARGV[n + 7]), tonumber(ARGV[n + 8]))
      n = n + 9
    elseif op == 'R' then
      answer = reserve(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]),
        tonumber(ARGV[n + 6])}, {0, 0, 0})
      n = n + 7
    elseif op == 'Q' then
      answer = reserve_line(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]),
        tonumber(ARGV[n + 6])},
        {tonumber(ARGV[n + 7]), tonumber(ARGV[n + 8]), tonumber(ARGV[n + 9])},
        ARGV[n + 10], ARGV[n + 11] == '1', tonumber(ARGV[n + 12]), tonumber(ARGV[n + 13]))
      n = n + 14
    elseif op == 'H' then
      answer = reserve(limits, {tonumber(ARGV[n + 4]), tonumber(ARGV[n + 5]),
        tonumber(ARGV[n + 6])},
        {tonumber(ARGV[n + 7]), tonumber(ARGV[n + 8]), tonumber(ARGV[n + 9])})
      n = n + 10
    else
      return redis.error_reply('tower-llm-limits: unknown ledger operation ' .. tostring(op))
    end
  end
end

if answer[1] == 1 and #intent_writes > 0 then
  -- Its queued markers become a writer's.
  unqueue(intent_writes)
  mark_writing(intent_for, intent_writes)
elseif answer[1] == 2 and #intent_writes > 0 and intent_queued > 0 then
  -- Marked (or renewed) for as long as its wait, plus the grace, when
  -- that is longer: the marker lives while its request waits in line and
  -- asks again, and ends by itself if its process went away.
  mark_queued(math.max(intent_queued, answer[2] + grace), intent_tokens, intent_writes)
end
if answer[1] == 2 and #intent_renew > 0 then
  -- The ledger's other queued requests wait at least as long.
  renew_queued(answer[2] + grace, intent_renew)
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
  local ttl = math.floor(full_us / 1000) + 1 + idle_ms
  redis.call('PEXPIRE', key, ttl)
  if h['os'] then redis.call('PEXPIRE', outs, ttl) end
end
local reply = {now, answer[1], answer[2], answer[3], answer[4]}
for _, v in ipairs(outputs()) do table.insert(reply, v) end
if since >= 0 then
  for _, v in ipairs(markers()) do table.insert(reply, v) end
end
return reply
