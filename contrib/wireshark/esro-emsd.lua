-- Wireshark dissector for ESRO (RFC 2188, Efficient Short Remote
-- Operations) and EMSD (RFC 2524, Efficient Mail Submission and Delivery)
-- as spoken by esro-emsdp and the original reference implementation.
--
-- Load it for one run:   tshark -X lua_script:esro-emsd.lua -r capture.pcap
-- or install it:         cp esro-emsd.lua ~/.local/lib/wireshark/plugins/
--
-- Registered on UDP ports 641, 642, 259 and 2002, plus a heuristic for
-- other ports (an INVOKE of an EMSD operation whose argument parses, or
-- an answer to an INVOKE already seen). Filterable fields: esro.type,
-- esro.sap, esro.ref, esro.op, esro.encoding, esro.error, esro.failure,
-- esro.invoke_frame, emsd.op, emsd.pdu, emsd.instance, emsd.device,
-- emsd.password (always masked), emsd.segment.sequence,
-- emsd.segment.total, emsd.segment.number, emsd.content_type,
-- emsd.message_id, emsd.originator, emsd.sender, emsd.recipient,
-- emsd.subject, emsd.body_length, emsd.reassembled_length, emsd.error,
-- emsd.status, emsd.report.recipient, emsd.report.outcome.
-- Expert info flags malformed PDUs, retransmissions and duplicates,
-- ERROR and FAILURE answers, and reassembled messages.
--
-- Only EMSD 1.1 arguments are decoded field by field; 1.0 PDUs are shown
-- as their BER elements.

local esro = Proto("esro", "Efficient Short Remote Operations")
local emsd = Proto("emsd", "Efficient Mail Submission and Delivery")

local pdu_types = { [0] = "INVOKE", [1] = "RESULT", [2] = "ERROR", [3] = "ACK", [4] = "FAILURE" }
local header_len = { [0] = 3, [1] = 2, [2] = 3, [3] = 2, [4] = 3 }
local encodings = { [0] = "BER", [1] = "PER", [2] = "reserved-1", [3] = "reserved-2" }
local failures = { [0] = "transmission failure", [1] = "local resource",
	[2] = "user not responding", [3] = "remote resource" }
local operations = { [2] = "delivery-control", [4] = "submission-control", [5] = "delivery-verify",
	[6] = "submission-verify", [7] = "get-configuration", [8] = "set-configuration",
	[33] = "submission", [35] = "delivery" }
local error_codes = { [1] = "protocol-version-not-recognized", [2] = "submission-control-violated",
	[3] = "message-identifier-invalid", [4] = "security-error", [5] = "delivery-control-violated",
	[6] = "resource-error", [7] = "protocol-violation" }
local content_types = { [1] = "probe", [2] = "delivery-report", [32] = "ipm95", [33] = "voice-message" }
local delivery_status = { [1] = "no-report-sent", [2] = "delivery-report-sent", [3] = "non-delivery-report-sent" }
local submission_status = { [1] = "send-message", [2] = "drop-message" }
local reasons = { [0] = "transfer-failure", [1] = "unable-to-transfer", [2] = "restricted-delivery" }
local diagnostics = { [0] = "congestion", [1] = "loop-detected", [2] = "recipient-unavailable",
	[3] = "maximum-time-expired", [4] = "content-too-long", [5] = "size-constraint-violated",
	[6] = "protocol-violation", [7] = "content-type-not-supported", [8] = "too-many-recipients",
	[9] = "line-too-long", [10] = "unrecognized-address", [11] = "recipient-unknown",
	[12] = "recipient-refused-to-accept", [13] = "unable-to-complete-transfer",
	[14] = "transfer-attempts-limit-reached" }

local MASK = "********"

local f = {
	type = ProtoField.uint8("esro.type", "PDU type", base.DEC, pdu_types, 0x07),
	sap = ProtoField.uint8("esro.sap", "Destination SAP", base.DEC, nil, 0xf0),
	ref = ProtoField.uint8("esro.ref", "Invoke reference", base.DEC),
	op = ProtoField.uint8("esro.op", "Operation", base.DEC, nil, 0x3f),
	encoding = ProtoField.uint8("esro.encoding", "Encoding", base.DEC, encodings, 0xc0),
	error = ProtoField.uint8("esro.error", "Error value", base.DEC),
	failure = ProtoField.uint8("esro.failure", "Failure reason", base.DEC, failures),
	data_len = ProtoField.uint32("esro.data_length", "User data length", base.DEC),
	invoke_frame = ProtoField.framenum("esro.invoke_frame", "INVOKE in frame"),

	e_op = ProtoField.uint8("emsd.op", "Operation", base.DEC, operations),
	e_pdu = ProtoField.string("emsd.pdu", "PDU"),
	e_instance = ProtoField.uint8("emsd.instance", "Instance id", base.DEC),
	e_device = ProtoField.string("emsd.device", "Credentials address"),
	e_name = ProtoField.string("emsd.name", "EMSD name"),
	e_password = ProtoField.string("emsd.password", "Password (masked)"),
	e_seq = ProtoField.uint32("emsd.segment.sequence", "Segment sequence id", base.DEC),
	e_total = ProtoField.uint32("emsd.segment.total", "Segments in message", base.DEC),
	e_number = ProtoField.uint32("emsd.segment.number", "Segment number", base.DEC),
	e_ct = ProtoField.uint32("emsd.content_type", "Content type", base.DEC, content_types),
	e_ct_len = ProtoField.uint32("emsd.content_length", "Content octets in this PDU", base.DEC),
	e_msgid = ProtoField.string("emsd.message_id", "Message id"),
	e_subtime = ProtoField.string("emsd.submission_time", "Submission time"),
	e_deltime = ProtoField.string("emsd.delivery_time", "Delivery time"),
	e_orig = ProtoField.string("emsd.originator", "Originator"),
	e_sender = ProtoField.string("emsd.sender", "Sender"),
	e_rcpt = ProtoField.string("emsd.recipient", "Recipient"),
	e_subject = ProtoField.string("emsd.subject", "Subject"),
	e_body_len = ProtoField.uint32("emsd.body_length", "Body length", base.DEC),
	e_reasm = ProtoField.uint32("emsd.reassembled_length", "Reassembled content length", base.DEC),
	e_error = ProtoField.uint8("emsd.error", "Error code", base.DEC, error_codes),
	e_status = ProtoField.string("emsd.status", "Status"),
	e_rep_rcpt = ProtoField.string("emsd.report.recipient", "Reported recipient"),
	e_rep_outcome = ProtoField.string("emsd.report.outcome", "Outcome"),
	e_ber = ProtoField.bytes("emsd.ber", "BER element"),
}
esro.fields = { f.type, f.sap, f.ref, f.op, f.encoding, f.error, f.failure, f.data_len, f.invoke_frame }
emsd.fields = { f.e_op, f.e_pdu, f.e_instance, f.e_device, f.e_name, f.e_password, f.e_seq, f.e_total,
	f.e_number, f.e_ct, f.e_ct_len, f.e_msgid, f.e_subtime, f.e_deltime, f.e_orig, f.e_sender, f.e_rcpt,
	f.e_subject, f.e_body_len, f.e_reasm, f.e_error, f.e_status, f.e_rep_rcpt, f.e_rep_outcome, f.e_ber }

local ex = {
	malformed = ProtoExpert.new("esro.malformed", "Malformed ESRO PDU", expert.group.MALFORMED, expert.severity.ERROR),
	retrans = ProtoExpert.new("esro.retransmission", "Retransmission", expert.group.SEQUENCE, expert.severity.NOTE),
	duplicate = ProtoExpert.new("esro.duplicate", "Duplicate", expert.group.SEQUENCE, expert.severity.NOTE),
	failure = ProtoExpert.new("esro.failure.expert", "ESRO FAILURE", expert.group.RESPONSE_CODE, expert.severity.WARN),
	e_malformed = ProtoExpert.new("emsd.malformed", "Malformed EMSD PDU", expert.group.MALFORMED, expert.severity.WARN),
	e_error = ProtoExpert.new("emsd.error.expert", "EMSD error", expert.group.RESPONSE_CODE, expert.severity.NOTE),
	e_reasm = ProtoExpert.new("emsd.reassembled", "Segmented message reassembled", expert.group.REASSEMBLE, expert.severity.CHAT),
}
esro.experts = { ex.malformed, ex.retrans, ex.duplicate, ex.failure }
emsd.experts = { ex.e_malformed, ex.e_error, ex.e_reasm }

-- Conversation state, built on the first pass and kept per frame so that
-- a second pass (the GUI) shows the same.
local invocations = {} -- "invoker|performer|ref" -> {frame, op, data, reply, acked}
local frames = {}      -- frame number -> {op, invoke_frame, mark, reassembled (ByteArray)}
local partials = {}    -- "src|dst|seq" -> {total, parts, got, size}
local arguments = {}   -- "src|dst|op|data" -> frame

function esro.init()
	invocations, frames, partials, arguments = {}, {}, {}, {}
end

local function addr(pinfo, src)
	if src then
		return tostring(pinfo.src) .. ":" .. pinfo.src_port
	end
	return tostring(pinfo.dst) .. ":" .. pinfo.dst_port
end

-- ---- BER ----

-- ber reads one element at off within [off, limit): tag, content offset,
-- content length, next offset; nil and a reason when malformed.
local function ber(tvb, off, limit)
	if off + 2 > limit then
		return nil, "truncated element"
	end
	local tag = tvb(off, 1):uint()
	if bit32.band(tag, 0x1f) == 0x1f then
		return nil, "multi-octet tag"
	end
	local l = tvb(off + 1, 1):uint()
	local coff = off + 2
	if l == 0x80 then
		return nil, "indefinite length"
	elseif l > 0x80 then
		local n = l - 0x80
		if n > 3 or coff + n > limit then
			return nil, "bad length"
		end
		l = 0
		for i = 0, n - 1 do
			l = l * 256 + tvb(coff + i, 1):uint()
		end
		coff = coff + n
	end
	if coff + l > limit then
		return nil, "element runs past its container"
	end
	return tag, coff, l, coff + l
end

-- elements lists the elements of [off, limit). Tolerant: stop at the
-- first malformed element (raw contents follow the content type).
local function elements(tvb, off, limit, tolerant)
	local out = {}
	while off < limit do
		local tag, coff, len, nxt = ber(tvb, off, limit)
		if not tag then
			if tolerant then
				return out, coff .. " at offset " .. off
			end
			error(coff .. " at offset " .. off, 0)
		end
		out[#out + 1] = { tag = tag, off = off, coff = coff, len = len, next = nxt }
		off = nxt
	end
	return out
end

local function uint(tvb, e)
	local v = 0
	for i = 0, e.len - 1 do
		v = v * 256 + tvb(e.coff + i, 1):uint()
	end
	return v
end

local function str(tvb, e)
	if e.len == 0 then
		return ""
	end
	return tvb(e.coff, e.len):string()
end

local function range(tvb, e)
	return tvb(e.off, e.next - e.off)
end

local function bcd(tvb, e)
	local s = ""
	for i = 0, e.len - 1 do
		local x = tvb(e.coff + i, 1):uint()
		s = s .. string.format("%d%d", bit32.rshift(x, 4), bit32.band(x, 15))
	end
	local v = tonumber(s) or 0
	return string.format("%03d.%03d", math.floor(v / 1000), v % 1000)
end

local function emsd_time(v)
	return os.date("!%Y-%m-%dT%H:%M:%SZ", v)
end

local function children(tvb, e)
	return elements(tvb, e.coff, e.coff + e.len)
end

-- ---- EMSD 1.1 ----

-- or_address: 30 {04 bcd [80 name]} or 40 rfc822.
local function or_address(tvb, e)
	if e.tag == 0x40 then
		return str(tvb, e)
	end
	local c = children(tvb, e)
	if not c[1] or c[1].tag ~= 0x04 then
		error("bad EMSD address", 0)
	end
	local s = bcd(tvb, c[1])
	if c[2] and c[2].tag == 0x80 then
		s = str(tvb, c[2]) .. " <" .. s .. ">"
	end
	return s
end

local function local_id(tvb, e)
	local c = children(tvb, e)
	if #c < 2 then
		error("short local message id", 0)
	end
	return string.format("%08x.%08x", uint(tvb, c[1]), uint(tvb, c[2]))
end

local function message_id(tvb, e)
	if e.tag == 0x45 then
		return str(tvb, e)
	end
	return local_id(tvb, e)
end

local function security(tvb, tree, e, info)
	local c = children(tvb, e)
	if not c[1] then
		return
	end
	for _, x in ipairs(children(tvb, c[1])) do
		if x.tag == 0x30 then
			local a = children(tvb, x)
			if a[1] and a[1].tag == 0x04 then
				local dev = bcd(tvb, a[1])
				tree:add(f.e_device, range(tvb, a[1]), dev)
				info[#info + 1] = "device=" .. dev
			end
			if a[2] and a[2].tag == 0x80 then
				tree:add(f.e_name, range(tvb, a[2]), str(tvb, a[2]))
			end
		elseif x.tag == 0x80 then
			tree:add(f.e_password, range(tvb, x), MASK)
		end
	end
end

local function segment(tvb, tree, e, seg)
	local c = children(tvb, e)
	seg.first = e.tag == 0x62
	if c[1] then
		seg.seq = uint(tvb, c[1])
		tree:add(f.e_seq, range(tvb, c[1]), seg.seq)
	end
	if c[2] then
		seg.value = uint(tvb, c[2])
		if seg.first then
			tree:add(f.e_total, range(tvb, c[2]), seg.value)
		else
			tree:add(f.e_number, range(tvb, c[2]), seg.value)
		end
	end
end

local function ipm(tvb, tree, info)
	local top = elements(tvb, 0, tvb:len())
	if not top[1] or top[1].tag ~= 0x30 then
		error("IPM is not a SEQUENCE", 0)
	end
	local parts = children(tvb, top[1])
	local h = parts[1]
	if h then
		local t = tree:add(emsd, range(tvb, h), "Heading")
		for _, x in ipairs(children(tvb, h)) do
			if x.tag == 0xa0 then
				local s = children(tvb, x)
				if s[1] then
					t:add(f.e_sender, range(tvb, x), or_address(tvb, s[1]))
				end
			elseif x.tag == 0x30 and not info.orig_done then
				-- originator (an EMSD address) or the recipients
				local c = children(tvb, x)
				if c[1] and c[1].tag == 0x04 then
					local o = or_address(tvb, x)
					t:add(f.e_orig, range(tvb, x), o)
					info.orig_done = true
				else
					info.orig_done = true
					for _, r in ipairs(c) do
						local rc = children(tvb, r)
						if rc[1] then
							local a = or_address(tvb, rc[1])
							t:add(f.e_rcpt, range(tvb, rc[1]), a)
							info.rcpts[#info.rcpts + 1] = a
						end
					end
				end
			elseif x.tag == 0x40 and not info.orig_done then
				t:add(f.e_orig, range(tvb, x), str(tvb, x))
				info.orig_done = true
			elseif x.tag == 0x30 then
				for _, r in ipairs(children(tvb, x)) do
					local rc = children(tvb, r)
					if rc[1] then
						local a = or_address(tvb, rc[1])
						t:add(f.e_rcpt, range(tvb, rc[1]), a)
						info.rcpts[#info.rcpts + 1] = a
					end
				end
			elseif x.tag == 0x83 then
				info.subject = str(tvb, x)
				t:add(f.e_subject, range(tvb, x), info.subject)
			end
		end
	end
	local b = parts[2]
	if b then
		for _, x in ipairs(children(tvb, b)) do
			if x.tag == 0x04 then
				tree:add(f.e_body_len, range(tvb, x), x.len)
			end
		end
	end
end

local function report(tvb, tree, info)
	local top = elements(tvb, 0, tvb:len())
	if not top[1] then
		return
	end
	local c = children(tvb, top[1])
	if c[1] then
		tree:add(f.e_msgid, range(tvb, c[1]), message_id(tvb, c[1]))
	end
	if c[2] then
		for _, p in ipairs(children(tvb, c[2])) do
			local pc = children(tvb, p)
			if pc[1] then
				local r = or_address(tvb, pc[1])
				local t = tree:add(f.e_rep_rcpt, range(tvb, p), r)
				local o = pc[2]
				if o and o.tag == 0xa0 then
					local oc = children(tvb, o)
					local when = oc[1] and (" " .. emsd_time(uint(tvb, oc[1]))) or ""
					t:add(f.e_rep_outcome, range(tvb, o), "delivered" .. when)
				elseif o and o.tag == 0xa1 then
					local oc = children(tvb, o)
					local s = "not delivered"
					if oc[1] then
						s = s .. ": " .. (reasons[uint(tvb, oc[1])] or tostring(uint(tvb, oc[1])))
					end
					for k = 2, #oc do
						if oc[k].tag == 0x80 then
							s = s .. " (" .. (diagnostics[uint(tvb, oc[k])] or tostring(uint(tvb, oc[k]))) .. ")"
						elseif oc[k].tag == 0x81 then
							s = s .. " \"" .. str(tvb, oc[k]) .. "\""
						end
					end
					t:add(f.e_rep_outcome, range(tvb, o), s)
				end
			end
		end
	end
end

local function content(tvb, tree, ct, info)
	if ct == 32 then
		ipm(tvb, tree, info)
	elseif ct == 2 then
		report(tvb, tree, info)
	end
end

-- ber_tree shows any BER as a tree: the fallback for what is not decoded
-- field by field.
local function ber_tree(tvb, tree, off, limit, depth)
	for _, e in ipairs(elements(tvb, off, limit)) do
		local t = tree:add(f.e_ber, range(tvb, e))
		t:set_text(string.format("[%02x] %d octets", e.tag, e.len))
		if bit32.band(e.tag, 0x20) ~= 0 and depth < 12 then
			ber_tree(tvb, t, e.coff, e.coff + e.len, depth + 1)
		end
	end
end

-- argument decodes an INVOKE argument (after the instance id) at tvb
-- [off, end) into tree. It returns a summary for the info column.
local function argument(tvb, pinfo, tree, op, off, key, frame)
	local info = { rcpts = {} }
	local limit = tvb:len()
	local top = elements(tvb, off, limit)
	if #top ~= 1 or top[1].tag ~= 0x30 then
		error("argument is not one SEQUENCE", 0)
	end
	local c, stopped = elements(tvb, top[1].coff, top[1].coff + top[1].len, true)
	local i = 1
	local summary = {}
	local seg, ct, rest_off = nil, nil, nil
	if op == 33 or op == 35 then
		tree:add(f.e_pdu, op == 33 and "SubmitArgument" or "DeliverArgument")
		if op == 35 then
			if c[i] then
				local id = message_id(tvb, c[i])
				tree:add(f.e_msgid, range(tvb, c[i]), id)
				summary[#summary + 1] = "id=" .. id
				i = i + 1
			end
			if c[i] and c[i].tag == 0x02 then
				tree:add(f.e_deltime, range(tvb, c[i]), emsd_time(uint(tvb, c[i])))
				i = i + 1
			end
			if c[i] and c[i].tag == 0x80 then
				tree:add(f.e_subtime, range(tvb, c[i]), emsd_time(uint(tvb, c[i])))
				i = i + 1
			end
		end
		local sec = op == 33 and 0xa0 or 0xa1
		if c[i] and c[i].tag == sec then
			security(tvb, tree, c[i], summary)
			i = i + 1
		end
		if c[i] and (c[i].tag == 0x62 or c[i].tag == 0x63) then
			seg = {}
			segment(tvb, tree, c[i], seg)
			if seg.first then
				summary[#summary + 1] = string.format("segment 1/%d seq=%d", seg.value or 0, seg.seq or 0)
			else
				summary[#summary + 1] = string.format("segment #%d seq=%d", seg.value or 0, seg.seq or 0)
			end
			i = i + 1
		end
		if c[i] and c[i].tag == 0x02 then
			ct = uint(tvb, c[i])
			tree:add(f.e_ct, range(tvb, c[i]), ct)
			rest_off = c[i].next
		end
		if not ct then
			if stopped then
				error(stopped, 0)
			end
			return table.concat(summary, " ")
		end
		local rest_len = top[1].coff + top[1].len - rest_off
		tree:add(f.e_ct_len, tvb(rest_off, rest_len), rest_len)
		local whole = nil
		if not seg then
			whole = tvb(rest_off, rest_len):tvb()
		else
			local fr = frames[frame]
			if not pinfo.visited and not fr.retransmission then
				-- Segments are added in capture order; the last one
				-- completes the message (the first one gives the count).
				local pk = key .. "|" .. (seg.seq or 0)
				local p = partials[pk]
				if seg.first then
					p = { total = seg.value or 0, parts = {}, got = 0 }
					partials[pk] = p
				end
				local idx = seg.first and 0 or (seg.value or 0)
				if p and not p.parts[idx] then
					p.parts[idx] = tvb(rest_off, rest_len):bytes()
					p.got = p.got + 1
					if p.got == p.total then
						local ba = ByteArray.new()
						for n = 0, p.total - 1 do
							if p.parts[n] then
								ba:append(p.parts[n])
							end
						end
						fr.reassembled = ba
						partials[pk] = nil
					end
				end
			end
			if fr.reassembled then
				whole = fr.reassembled:tvb("Reassembled EMSD content")
				local t = tree:add(f.e_reasm, whole(), whole:len())
				t:add_proto_expert_info(ex.e_reasm, string.format("Reassembled %d octets", whole:len()))
				summary[#summary + 1] = "reassembled"
			end
		end
		if whole then
			local ok, err = pcall(content, whole, tree, ct, info)
			if not ok then
				tree:add_proto_expert_info(ex.e_malformed, "content: " .. tostring(err))
			end
			if #info.rcpts > 0 then
				summary[#summary + 1] = "to=" .. table.concat(info.rcpts, ",")
			end
			if info.subject then
				summary[#summary + 1] = "subject=\"" .. info.subject .. "\""
			end
		end
	elseif op == 5 or op == 6 then
		tree:add(f.e_pdu, op == 5 and "DeliveryVerifyArgument" or "SubmissionVerifyArgument")
		if c[1] then
			local id = message_id(tvb, c[1])
			tree:add(f.e_msgid, range(tvb, c[1]), id)
			summary[#summary + 1] = "id=" .. id
		end
	elseif op == 2 then
		tree:add(f.e_pdu, "DeliveryControlArgument")
		for _, x in ipairs(c) do
			if x.tag == 0xa4 then
				security(tvb, tree, x, summary)
			end
		end
		ber_tree(tvb, tree, off, limit, 0)
	else
		ber_tree(tvb, tree, off, limit, 0)
	end
	return table.concat(summary, " ")
end

local result_pdus = { [33] = "SubmitResult", [35] = "DeliverResult", [2] = "DeliveryControlResult",
	[5] = "DeliveryVerifyResult", [6] = "SubmissionVerifyResult" }

local function result(tvb, tree, op, off)
	local limit = tvb:len()
	if result_pdus[op] then
		tree:add(f.e_pdu, result_pdus[op])
	end
	if off >= limit then
		return ""
	end
	local top = elements(tvb, off, limit)
	local c = top[1] and children(tvb, top[1]) or {}
	if op == 33 then
		if c[1] then
			local id = local_id(tvb, c[1])
			tree:add(f.e_msgid, range(tvb, c[1]), id)
			return "id=" .. id
		end
	elseif op == 5 or op == 6 then
		if c[1] then
			local v = uint(tvb, c[1])
			local s = (op == 5 and delivery_status or submission_status)[v] or tostring(v)
			tree:add(f.e_status, range(tvb, c[1]), s)
			return "status=" .. s
		end
	elseif op == 2 then
		ber_tree(tvb, tree, off, limit, 0)
	else
		ber_tree(tvb, tree, off, limit, 0)
	end
	return ""
end

-- ---- ESRO ----

local function dissect(tvb, pinfo, root)
	local n = tvb:len()
	local frame = pinfo.number
	pinfo.cols.protocol = "ESRO"
	local t = root:add(esro, tvb())
	if n == 0 then
		t:add_proto_expert_info(ex.malformed, "Empty datagram")
		pinfo.cols.info = "ESRO malformed: empty"
		return
	end
	local ty = bit32.band(tvb(0, 1):uint(), 7)
	local hl = header_len[ty]
	if not hl then
		t:add(f.type, tvb(0, 1))
		t:add_proto_expert_info(ex.malformed, "Invalid PDU type " .. ty)
		pinfo.cols.info = "ESRO malformed: type " .. ty
		return
	end
	if n < hl then
		t:add(f.type, tvb(0, 1))
		t:add_proto_expert_info(ex.malformed, string.format("%s shorter than its %d-octet header", pdu_types[ty], hl))
		pinfo.cols.info = "ESRO malformed: " .. pdu_types[ty] .. " truncated"
		return
	end
	local ref = tvb(1, 1):uint()
	t:add(f.type, tvb(0, 1))
	local src, dst = addr(pinfo, true), addr(pinfo, false)
	local fr = frames[frame]
	if not fr then
		fr = {}
		frames[frame] = fr
	end
	local info = pdu_types[ty]
	if ty == 0 then
		t:add(f.sap, tvb(0, 1))
		t:add(f.ref, tvb(1, 1))
		t:add(f.encoding, tvb(2, 1))
		t:add(f.op, tvb(2, 1))
		local op = bit32.band(tvb(2, 1):uint(), 0x3f)
		local data = n > 3 and tvb(3):bytes():tohex() or ""
		if not pinfo.visited then
			local k = src .. "|" .. dst .. "|" .. ref
			local inv = invocations[k]
			if inv and inv.data == data and inv.op == op then
				fr.retransmission, fr.invoke_frame = true, inv.frame
			else
				invocations[k] = { frame = frame, op = op, data = data }
				local ak = src .. "|" .. dst .. "|" .. op .. "|" .. data
				if operations[op] and arguments[ak] then
					fr.duplicate = arguments[ak]
				else
					arguments[ak] = frame
				end
			end
			fr.op = op
		end
		info = string.format("INVOKE sap=%d ref=%d op=%d", bit32.rshift(tvb(0, 1):uint(), 4), ref, op)
	elseif ty == 1 or ty == 2 then
		t:add(f.encoding, tvb(0, 1))
		t:add(f.ref, tvb(1, 1))
		if ty == 2 then
			t:add(f.error, tvb(2, 1))
		end
		if not pinfo.visited then
			local inv = invocations[dst .. "|" .. src .. "|" .. ref]
			if inv then
				local data = tvb():bytes():tohex()
				if inv.reply == data then
					fr.retransmission = true
				end
				inv.reply = data
				fr.invoke_frame, fr.op = inv.frame, inv.op
			end
		end
		info = string.format("%s ref=%d", pdu_types[ty], ref)
		if ty == 2 then
			local v = tvb(2, 1):uint()
			info = info .. string.format(" error=%d (%s)", v, error_codes[v] or "?")
			t:add_proto_expert_info(ex.e_error, "EMSD error " .. (error_codes[v] or tostring(v)))
		end
	elseif ty == 3 then
		t:add(f.ref, tvb(1, 1))
		if not pinfo.visited then
			local inv = invocations[src .. "|" .. dst .. "|" .. ref]
			if inv then
				fr.invoke_frame = inv.frame
				fr.dup_ack = inv.acked
				inv.acked = true
			end
		end
		info = string.format("ACK ref=%d", ref)
	elseif ty == 4 then
		t:add(f.ref, tvb(1, 1))
		t:add(f.failure, tvb(2, 1))
		local v = tvb(2, 1):uint()
		t:add_proto_expert_info(ex.failure, "FAILURE: " .. (failures[v] or tostring(v)))
		if not pinfo.visited then
			local inv = invocations[dst .. "|" .. src .. "|" .. ref] or invocations[src .. "|" .. dst .. "|" .. ref]
			if inv then
				fr.invoke_frame = inv.frame
			end
		end
		info = string.format("FAILURE ref=%d reason=%d (%s)", ref, v, failures[v] or "?")
	end
	t:add(f.data_len, n - hl)
	if fr.invoke_frame and fr.invoke_frame ~= frame then
		t:add(f.invoke_frame, fr.invoke_frame)
	end
	if fr.retransmission then
		t:add_proto_expert_info(ex.retrans, "Retransmission")
		info = info .. " [retransmission]"
	elseif fr.duplicate then
		t:add_proto_expert_info(ex.duplicate, "Duplicate of frame " .. fr.duplicate .. " (re-invoked)")
		info = info .. " [duplicate]"
	elseif fr.dup_ack then
		t:add_proto_expert_info(ex.duplicate, "Duplicate ACK")
		info = info .. " [duplicate]"
	end

	-- EMSD: INVOKEs of an EMSD operation, the answers to them.
	local op = fr.op
	if (ty == 0 or ty == 1 or ty == 2) and op and operations[op] then
		pinfo.cols.protocol = "EMSD"
		local et = root:add(emsd, tvb(hl))
		et:add(f.e_op, op):set_generated()
		local ok, res = pcall(function()
			if ty == 0 then
				local off = 3
				if op >= 32 then
					if n < 4 then
						error("instance-id octet missing", 0)
					end
					et:add(f.e_instance, tvb(3, 1))
					off = 4
				end
				return argument(tvb, pinfo, et, op, off, src .. "|" .. dst, frame)
			elseif ty == 1 then
				return result(tvb, et, op, 2)
			else
				et:add(f.e_pdu, "ErrorParameter")
				et:add(f.e_error, tvb(2, 1))
				return ""
			end
		end)
		info = info .. " " .. operations[op]
		if ok then
			if res ~= "" then
				info = info .. " " .. res
			end
		else
			et:add_proto_expert_info(ex.e_malformed, tostring(res))
			info = info .. " [malformed]"
		end
	end
	pinfo.cols.info = info
end

function esro.dissector(tvb, pinfo, tree)
	dissect(tvb, pinfo, tree)
	return tvb:len()
end

-- The heuristic accepts an INVOKE to an odd SAP 3..13 of an EMSD operation
-- in BER whose argument is one BER SEQUENCE, or an answer to an INVOKE
-- already seen.
local function heuristic(tvb, pinfo, tree)
	local n = tvb:len()
	if n < 2 then
		return false
	end
	local b0 = tvb(0, 1):uint()
	local ty = bit32.band(b0, 7)
	local src, dst = addr(pinfo, true), addr(pinfo, false)
	local ref = tvb(1, 1):uint()
	local ok = false
	if frames[pinfo.number] then
		ok = true
	elseif ty == 0 and n >= 5 then
		local sap = bit32.rshift(b0, 4)
		local b2 = tvb(2, 1):uint()
		local op = bit32.band(b2, 0x3f)
		if sap >= 3 and sap <= 13 and sap % 2 == 1 and bit32.band(b2, 0xc0) == 0 and operations[op] then
			local off = op >= 32 and 4 or 3
			local tag, _, _, nxt = ber(tvb, off, n)
			ok = tag == 0x30 and nxt == n
		end
	elseif ty == 1 or ty == 2 then
		ok = invocations[dst .. "|" .. src .. "|" .. ref] ~= nil
	elseif ty == 3 then
		ok = invocations[src .. "|" .. dst .. "|" .. ref] ~= nil
	elseif ty == 4 then
		ok = invocations[dst .. "|" .. src .. "|" .. ref] ~= nil or invocations[src .. "|" .. dst .. "|" .. ref] ~= nil
	end
	if not ok then
		return false
	end
	dissect(tvb, pinfo, tree)
	return true
end

local udp = DissectorTable.get("udp.port")
for _, port in ipairs({ 641, 642, 259, 2002 }) do
	udp:add(port, esro)
end
esro:register_heuristic("udp", heuristic)
