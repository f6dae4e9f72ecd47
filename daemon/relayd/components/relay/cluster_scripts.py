"""The Lua scripts of the relay cluster (cluster.py): each runs atomically inside Redis, so a
lookup and what follows from it (publish, claim, delete) can never interleave with another node's.

Registry values are ``NODE\\nCONNECTION_ID\\nJSON_QUOTED_IDENTITY``; envelopes on a node's
channel are ``DEST_NODE\\n`` followed by one JSON envelope a line.
"""

# ARGV: channel prefix, this node, registry key prefix, then three lists joined by newlines (none
# of their items has one: UUIDs, JSON-quoted identities, JSON envelopes): peers, the senders'
# identities, envelopes. One string per list, not one argument per item: redis-py spends ~20 us
# packing each argument, more than the relay's whole work on a message. Per peer: 1 published,
# 0 nobody has it (entries of dead nodes, whose channel has no subscriber, are removed), -1
# another identity has it. Envelopes for one node go out as one PUBLISH, in order: under load a
# node receives few, large messages.
FORWARD = """
local function lines(s)
  local t = {}
  for item in string.gmatch(s, '[^\\n]+') do t[#t + 1] = item end
  return t
end
local peers, identities, envelopes = lines(ARGV[4]), lines(ARGV[5]), lines(ARGV[6])
local keys, results, batches, order = {}, {}, {}, {}
for i, peer in ipairs(peers) do
  local key = ARGV[3] .. peer
  keys[i] = key
  local v = redis.call('GET', key)
  local result = 0
  if v then
    local node, identity = string.match(v, '^([^\\n]*)\\n[^\\n]*\\n(.*)$')
    if not node or node == ARGV[2] then
      redis.call('DEL', key)
    elseif identity ~= identities[i] then
      result = -1
    else
      local batch = batches[node]
      if not batch then
        batch = {envelopes = {}, members = {}}
        batches[node] = batch
        order[#order + 1] = node
      end
      batch.envelopes[#batch.envelopes + 1] = envelopes[i]
      batch.members[#batch.members + 1] = i
      result = 1
    end
  end
  results[i] = result
end
for _, node in ipairs(order) do
  local batch = batches[node]
  if redis.call('PUBLISH', ARGV[1] .. node, node .. '\\n' .. table.concat(batch.envelopes, '\\n')) == 0 then
    for _, i in ipairs(batch.members) do
      results[i] = 0
      redis.call('DEL', keys[i])
    end
  end
end
return results
"""
# KEYS[1] registry key; ARGV: our value, identity, channel prefix, TTL, this node, evict envelope head.
# Returns -1 if another identity holds the UUID (the caller refuses with 4002), else takes it and
# tells the previous holder's node to close that connection with 4004, as one node does.
CLAIM = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then
  local node, conn, identity = string.match(v, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')
  if node and identity ~= ARGV[2] then return -1 end
  if node and node ~= ARGV[5] then
    redis.call('PUBLISH', ARGV[3] .. node, node .. '\\n' .. ARGV[6] .. conn .. '"}')
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
return 1
"""
# KEYS registry keys; ARGV[1] TTL, then our value per key. Returns the 1-based indexes of keys
# another node holds now (it claimed the UUID: our connection must go, as an evict would say).
REFRESH = """
local lost = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v or v == ARGV[i + 1] then redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
  else lost[#lost + 1] = i end
end
return lost
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
