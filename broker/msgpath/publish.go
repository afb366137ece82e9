package msgpath

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/beforesend"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/broker/service/groups"
)

// Error codes of PROTOCOL.md section 5.
const (
	CodeNotAuthorized = "not_authorized"
	CodeBadTopic      = "bad_topic"
	CodeTooLarge      = "too_large"
	CodeBadPayload    = "bad_payload"
	CodeQueueFull     = "queue_full"
	CodeRateLimited   = "rate_limited"
	CodeUnknownGroup  = "unknown_group"
	CodeRejected      = "rejected"

	// refusedNoSpace labels, in metrics only, publishes refused for lack
	// of disk space: clients see them as any other failure to store.
	refusedNoSpace = "no_space"
)

// reasonCodes maps a protocol error code to its MQTT 5 PUBACK reason code.
var reasonCodes = map[string]byte{
	CodeNotAuthorized: 0x87,
	CodeBadTopic:      0x90,
	CodeTooLarge:      0x95,
	CodeQueueFull:     0x97,
	CodeRateLimited:   0x97,
	CodeBadPayload:    0x99,
	CodeUnknownGroup:  0x90,
	CodeRejected:      0x87,
}

// ErrResend ends a 3.1.1 connection whose publish could not be stored, so
// that the client sends it again after reconnecting (PROTOCOL.md section 9).
var ErrResend = errors.New("publish not stored, to be sent again")

// unspecifiedError is the MQTT 5 reason code for a publish the server failed to store.
const unspecifiedError = 0x80

// Publish is a client's PUBLISH, as the path needs it.
type Publish struct {
	// Topic is the topic name.
	Topic string
	// Payload is the message as the client sent it.
	Payload []byte
	// PacketID is answered by the PUBACK.
	PacketID uint16
	// QoS is 0 or 1; the broker refuses 2 before the path.
	QoS byte
}

// Publish is the publish step: it checks a client's publish, stores it
// and answers it once it is durable, or refuses it (PROTOCOL.md sections 1,
// 3, 4 and 5). It runs on the client's goroutine and blocks only while
// the sender is over its rate or the committer is saturated. Every answer
// goes through the committer, so PUBACKs keep publish order.
func (p *Path) Publish(s *Session, pub Publish) {
	ok, waited := s.budget.Spend(1, len(pub.Payload))
	if waited {
		p.observe.Delayed()
	}
	if !ok {
		p.refuse(s, pub, CodeRateLimited, "publish rate limit: slow down")
		return
	}
	kind, to := topic.Parse(pub.Topic)
	switch kind {
	case topic.Inbox:
		p.publishInbox(s, pub, to)
	case topic.Group:
		p.publishGroup(s, pub, to)
	case topic.Receipt:
		p.publishReceipt(s, pub, to)
	case topic.Typing:
		p.publishTyping(s, pub, to)
	case topic.Presence:
		p.refuse(s, pub, CodeNotAuthorized, "presence topics are published by the server only")
	default:
		p.refuse(s, pub, CodeBadTopic, fmt.Sprintf("cannot publish to %q", pub.Topic))
	}
}

func (p *Path) publishInbox(s *Session, pub Publish, to string) {
	id, ok := p.validate(s, pub, envelope.Validate)
	if !ok || !p.allowed(s, pub, to, "") {
		return
	}
	ts := p.now().UnixMilli()
	r := &queue.Request{
		To: to, Sender: s.user, ID: id, Meta: envelope.Meta(s.user, "", id),
		Data:     envelope.Message(s.user, to, "", ts, pub.Payload),
		OnStored: p.notify,
		Done:     p.answer(s, pub, id, fmt.Sprintf("the queue of %s is full", to)),
	}
	if s.copiesTo(to) {
		r.Fanout = []queue.Fanout{s.copyOf(envelope.Sent(s.user, to, "", ts, pub.Payload))}
	}
	p.store.Append(r)
}

// copiesTo reports whether what s sends to user to is copied to the other
// devices of s's user (PROTOCOL.md section 4): not when s makes no copies,
// nor when to is that user, whose devices all get it anyway.
func (s *Session) copiesTo(to string) bool { return s.copyMeta != nil && to != s.user }

// copyOf is the copy of what s sent, data, for its user's other devices.
func (s *Session) copyOf(data []byte) queue.Fanout {
	return queue.Fanout{To: s.user, Data: data, Meta: s.copyMeta, Own: true}
}

// publishGroup stores a member's message once per other member, in one
// commit, with the group in each envelope (PROTOCOL.md section 4).
func (p *Path) publishGroup(s *Session, pub Publish, gid string) {
	g, err := p.groups.Get(gid)
	switch {
	case errors.Is(err, groups.ErrUnknown):
		p.refuse(s, pub, CodeUnknownGroup, fmt.Sprintf("no group %q", gid))
		return
	case err != nil:
		// The group may well exist: the publish is not refused for good
		// but answered like a message that could not be stored, so that
		// the client sends it again (PROTOCOL.md section 9).
		p.log.Error("read group", "group", gid, "error", err)
		p.notStored(s, pub, fmt.Errorf("read group %s: %w", gid, err))
		return
	case !g.IsMember(s.user):
		p.refuse(s, pub, CodeNotAuthorized, fmt.Sprintf("not a member of %q", gid))
		return
	}
	id, ok := p.validate(s, pub, envelope.Validate)
	if !ok || !p.allowed(s, pub, "", gid) {
		return
	}
	// One publish is stored once per member: it costs the sender's budget
	// once per copy beyond the first, already paid.
	if extra := len(g.Members) - 2; extra > 0 {
		ok, waited := s.budget.Spend(extra, extra*len(pub.Payload))
		if waited {
			p.observe.Delayed()
		}
		if !ok {
			p.refuse(s, pub, CodeRateLimited, fmt.Sprintf("a message to the %d members of %q is over your rate limit", len(g.Members), gid))
			return
		}
	}
	ts := p.now().UnixMilli()
	fan := make([]queue.Fanout, 0, len(g.Members))
	for _, m := range g.Members {
		if m != s.user {
			fan = append(fan, queue.Fanout{To: m, Data: envelope.Message(s.user, m, gid, ts, pub.Payload)})
		}
	}
	if s.copyMeta != nil {
		// The sent copy of a group message names the group as its "to".
		fan = append(fan, s.copyOf(envelope.Sent(s.user, gid, gid, ts, pub.Payload)))
	}
	// When every member's queue is full the store reports Full (and keeps
	// no dedup key, so a resend is stored); when only some are, the
	// message is stored for the others and acknowledged, and the sender
	// is told whom it missed.
	p.store.Append(&queue.Request{
		Sender: s.user, ID: id, Meta: envelope.Meta(s.user, gid, id), Fanout: fan,
		OnFull:   func(users []string) { p.unreached(s, id, gid, users) },
		OnStored: p.notify,
		Done:     p.answer(s, pub, id, fmt.Sprintf("the queue of every other member of %q is full", gid)),
	})
}

// maxUnreachedNamed caps the members named in one unreached error event.
const maxUnreachedNamed = 20

// unreached queues, to the sender of a group message stored for some
// members, an error event naming the members whose full queues it missed.
// It runs on the committer goroutine, so it must not wait for it.
func (p *Path) unreached(s *Session, ref, gid string, users []string) {
	named, more := users, ""
	if len(named) > maxUnreachedNamed {
		named, more = named[:maxUnreachedNamed], fmt.Sprintf(" and %d more", len(named)-maxUnreachedNamed)
	}
	reason := fmt.Sprintf("stored for the other members of %q, whose queues had room; queue full, could not reach: %s%s",
		gid, strings.Join(named, ", "), more)
	ok := p.store.TryAppend(&queue.Request{
		To: s.user, Data: envelope.Error(ref, CodeQueueFull, reason),
		OnStored: p.notify,
		Done: func(st queue.Status, _ queue.Message, err error) {
			if st == queue.Failed || st == queue.Full {
				p.log.Warn("error event not queued", "user", s.user, "code", CodeQueueFull, "status", st, "error", err)
			}
		},
	})
	if !ok {
		p.log.Warn("error event dropped: queue busy", "user", s.user, "code", CodeQueueFull)
	}
}

// publishReceipt forwards a read receipt to the original sender's inbox.
// Receipts carry no metadata, so they never generate receipts themselves.
func (p *Path) publishReceipt(s *Session, pub Publish, to string) {
	var ids []string
	readIDs := func(b []byte, max int) (string, error) {
		var err error
		ids, err = envelope.ReadReceipt(b, max)
		return "", err
	}
	if _, ok := p.validate(s, pub, readIDs); !ok {
		return
	}
	// A read receipt is a client publish like a message: under a dedup
	// key of its own it stops at the disk reserve as messages do (the
	// store lets only server-made events, which carry none, past it), and
	// the same receipt sent again, resent after a reconnect or by the
	// reader's other device, is queued once.
	ts := p.now().UnixMilli()
	done := p.answer(s, pub, "", fmt.Sprintf("the queue of %s is full", to))
	if p.events.Enabled() {
		answer := done
		done = func(st queue.Status, m queue.Message, err error) {
			answer(st, m, err)
			if st == queue.Stored { // not a duplicate: told once
				p.events.Emit(events.MessageRead, events.Read{By: s.user, To: to, IDs: ids})
			}
		}
	}
	r := &queue.Request{
		To: to, Sender: s.user, ID: receiptID(to, ids),
		Data:     envelope.Receipt("read", s.user, ids, ts),
		OnStored: p.notify,
		Done:     done,
	}
	if s.copiesTo(to) {
		// The reader's other devices learn what was read, to clear their
		// unread counts.
		r.Fanout = []queue.Fanout{s.copyOf(envelope.ReadCopy(s.user, to, ids, ts))}
	}
	p.store.Append(r)
}

// receiptID is the dedup id of a read receipt of ids sent to to. Longer
// than any message id (envelope.MaxIDLen), it never matches one of the
// reader's own messages.
func receiptID(to string, ids []string) string {
	sum := sha256.New()
	var n [binary.MaxVarintLen64]byte
	for _, s := range append([]string{to}, ids...) {
		sum.Write(n[:binary.PutUvarint(n[:], uint64(len(s)))])
		sum.Write([]byte(s))
	}
	return "read-receipt/" + hex.EncodeToString(sum.Sum(nil))
}

// publishTyping passes a typing signal to the recipient's online devices
// at QoS 0; it is never stored. A QoS 1 publish is acknowledged in order.
func (p *Path) publishTyping(s *Session, pub Publish, to string) {
	signal := envelope.Typing(s.user, p.now().UnixMilli())
	p.delivery.Ephemeral(to, topic.InboxOf(to), signal)
	if p.peers != nil {
		p.peers.Typing(to, topic.InboxOf(to), signal)
	}
	if pub.QoS > 0 {
		pid := pub.PacketID
		p.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
			s.w.Puback(pid, 0)
			s.w.Flush(false)
		}})
	}
}

// validate checks a payload with check and refuses the publish with the
// matching error code when it fails.
func (p *Path) validate(s *Session, pub Publish, check func([]byte, int) (string, error)) (string, bool) {
	v, err := check(pub.Payload, p.limits.maxMessageBytes)
	switch {
	case errors.Is(err, envelope.ErrTooLarge):
		p.refuse(s, pub, CodeTooLarge, err.Error())
		return "", false
	case err != nil:
		p.refuse(s, pub, CodeBadPayload, err.Error())
		return "", false
	}
	return v, true
}

// allowed asks the before-send service, if one is set, whether a message
// to user to (or group gid) may be stored, and refuses it if not. It runs
// on the sender's goroutine: a slow service delays this sender alone.
func (p *Path) allowed(s *Session, pub Publish, to, gid string) bool {
	if p.beforeSend == nil {
		return true
	}
	ok, reason := p.beforeSend.Check(beforesend.Message{From: s.user, To: to, Group: gid, Msg: pub.Payload})
	if !ok {
		p.refuse(s, pub, CodeRejected, reason)
	}
	return ok
}

// answer returns the Done of a stored publish: the PUBACK, or the refusal.
func (p *Path) answer(s *Session, pub Publish, id, fullReason string) func(queue.Status, queue.Message, error) {
	pid, qos1 := pub.PacketID, pub.QoS > 0
	return func(st queue.Status, _ queue.Message, err error) {
		switch st {
		case queue.Stored, queue.Duplicate, queue.Passed:
			if qos1 {
				s.w.Puback(pid, 0)
				s.w.Flush(false)
			}
		case queue.Full:
			p.refuseStored(s, pid, qos1, id, CodeQueueFull, fullReason)
		default:
			p.failed(s, pid, qos1, err)
		}
	}
}

// refuse answers a publish that is refused before it reaches the queue.
// The answer goes through the committer so PUBACKs stay in publish order.
func (p *Path) refuse(s *Session, pub Publish, code, reason string) {
	p.observe.Refused(code)
	pid, qos1 := pub.PacketID, pub.QoS > 0
	if s.v5 {
		if qos1 {
			p.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
				s.w.Puback(pid, reasonCodes[code])
				s.w.Flush(false)
			}})
		}
		return
	}
	p.store.Append(&queue.Request{
		To:       s.user,
		Data:     envelope.Error(envelope.RefOf(pub.Payload), code, reason),
		OnStored: p.notify,
		Done: func(queue.Status, queue.Message, error) {
			if qos1 {
				s.w.Puback(pid, 0)
				s.w.Flush(false)
			}
		},
	})
}

// refuseStored answers a publish the committer refused; it runs on the
// committer goroutine, so it must not wait for the committer.
func (p *Path) refuseStored(s *Session, pid uint16, qos1 bool, ref, code, reason string) {
	p.observe.Refused(code)
	if s.v5 {
		if qos1 {
			s.w.Puback(pid, reasonCodes[code])
			s.w.Flush(false)
		}
		return
	}
	if qos1 {
		s.w.Puback(pid, 0)
		s.w.Flush(false)
	}
	ok := p.store.TryAppend(&queue.Request{
		To: s.user, Data: envelope.Error(ref, code, reason),
		OnStored: p.notify,
		Done:     func(queue.Status, queue.Message, error) {},
	})
	if !ok {
		p.log.Warn("error event dropped: queue busy", "user", s.user, "code", code)
	}
}

// failed answers a publish that could not be stored. A v3 client has no
// negative PUBACK, so it is disconnected and will resend after reconnecting.
func (p *Path) failed(s *Session, pid uint16, qos1 bool, err error) {
	if errors.Is(err, queue.ErrNoSpace) {
		// The store logs the low-disk state once; a line per refused
		// publish would fill the disk's last room with logs.
		p.observe.Refused(refusedNoSpace)
	} else {
		p.log.Error("store message", "user", s.user, "error", err)
	}
	p.resend(s, pid, qos1, err)
}

// notStored answers, in publish order, a publish that could not be stored
// for err, already logged: as failed does, so that the client resends it.
func (p *Path) notStored(s *Session, pub Publish, err error) {
	pid, qos1 := pub.PacketID, pub.QoS > 0
	p.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
		p.resend(s, pid, qos1, err)
	}})
}

// resend asks the client to send a publish again: MQTT 5 PUBACK 0x80, or
// for v3 the end of the connection (PROTOCOL.md section 9).
func (p *Path) resend(s *Session, pid uint16, qos1 bool, err error) {
	if s.v5 {
		if qos1 {
			s.w.Puback(pid, unspecifiedError)
			s.w.Flush(false)
		}
		return
	}
	// The connection the publish came on; ending one already closed does
	// nothing.
	s.end(fmt.Errorf("%w: %w", ErrResend, err))
}
