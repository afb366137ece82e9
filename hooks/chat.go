package hooks

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/groups"
)

// publishGroup stores a member's message once per other member, in one
// commit, with the group in each envelope (PROTOCOL.md section 4).
func (h *Inbox) publishGroup(s *session, pk packets.Packet, gid string) {
	g, err := h.Groups.Get(gid)
	switch {
	case errors.Is(err, groups.ErrUnknown):
		h.refuse(s, pk, CodeUnknownGroup, fmt.Sprintf("no group %q", gid))
		return
	case err != nil:
		// The group may well exist: the publish is not refused for good
		// but answered like a message that could not be stored, so that
		// the client sends it again (PROTOCOL.md section 9).
		h.Log.Error("read group", "group", gid, "error", err)
		h.notStored(s, pk, fmt.Errorf("read group %s: %w", gid, err))
		return
	case !g.IsMember(s.user):
		h.refuse(s, pk, CodeNotAuthorized, fmt.Sprintf("not a member of %q", gid))
		return
	}
	id, ok := h.validate(s, pk, envelope.Validate)
	if !ok {
		return
	}
	// One publish is stored once per member: it costs the sender's budget
	// once per copy beyond the first, already paid.
	if extra := len(g.Members) - 2; extra > 0 {
		ok, waited := s.budget.spendN(extra, extra*len(pk.Payload))
		if waited {
			h.Observe.Delayed()
		}
		if !ok {
			h.refuse(s, pk, CodeRateLimited, fmt.Sprintf("a message to the %d members of %q is over your rate limit", len(g.Members), gid))
			return
		}
	}
	ts := time.Now().UnixMilli()
	fan := make([]queue.Fanout, 0, len(g.Members)-1)
	for _, m := range g.Members {
		if m != s.user {
			fan = append(fan, queue.Fanout{To: m, Data: envelope.Message(s.user, m, gid, ts, pk.Payload)})
		}
	}
	// When every member's queue is full the store reports Full (and keeps
	// no dedup key, so a resend is stored); when only some are, the
	// message is stored for the others and acknowledged, and the sender
	// is told whom it missed.
	h.Queue.Append(&queue.Request{
		Sender: s.user, ID: id, Meta: envelope.Meta(s.user, gid, id), Fanout: fan,
		OnFull: func(users []string) { h.unreached(s, id, gid, users) },
		Done:   h.answer(s, pk, id, fmt.Sprintf("the queue of every other member of %q is full", gid)),
	})
}

// maxUnreachedNamed caps the members named in one unreached error event.
const maxUnreachedNamed = 20

// unreached queues, to the sender of a group message stored for some
// members, an error event naming the members whose full queues it missed.
// It runs on the committer goroutine, so it must not wait for it.
func (h *Inbox) unreached(s *session, ref, gid string, users []string) {
	named, more := users, ""
	if len(named) > maxUnreachedNamed {
		named, more = named[:maxUnreachedNamed], fmt.Sprintf(" and %d more", len(named)-maxUnreachedNamed)
	}
	reason := fmt.Sprintf("stored for the other members of %q, whose queues had room; queue full, could not reach: %s%s",
		gid, strings.Join(named, ", "), more)
	ok := h.Queue.TryAppend(&queue.Request{
		To: s.user, Data: envelope.Error(ref, CodeQueueFull, reason),
		Done: func(st queue.Status, _ queue.Message, err error) {
			if st == queue.Failed || st == queue.Full {
				h.Log.Warn("error event not queued", "user", s.user, "code", CodeQueueFull, "status", int(st), "error", err)
			}
		},
	})
	if !ok {
		h.Log.Warn("error event dropped: queue busy", "user", s.user, "code", CodeQueueFull)
	}
}

// publishReceipt forwards a read receipt to the original sender's inbox.
// Receipts carry no metadata, so they never generate receipts themselves.
func (h *Inbox) publishReceipt(s *session, pk packets.Packet, to string) {
	var ids []string
	readIDs := func(b []byte, max int) (string, error) {
		var err error
		ids, err = envelope.ReadReceipt(b, max)
		return "", err
	}
	if _, ok := h.validate(s, pk, readIDs); !ok {
		return
	}
	// A read receipt is a client publish like a message: under a dedup
	// key of its own it stops at the disk reserve as messages do (the
	// store lets only server-made events, which carry none, past it), and
	// the same receipt sent again, resent after a reconnect or by the
	// reader's other device, is queued once.
	h.Queue.Append(&queue.Request{
		To: to, Sender: s.user, ID: receiptID(to, ids),
		Data: envelope.Receipt("read", s.user, ids, time.Now().UnixMilli()),
		Done: h.answer(s, pk, "", fmt.Sprintf("the queue of %s is full", to)),
	})
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
func (h *Inbox) publishTyping(s *session, pk packets.Packet, to string) {
	signal := envelope.Typing(s.user, time.Now().UnixMilli())
	h.Delivery.Ephemeral(to, topic.InboxOf(to), signal)
	if h.Peers != nil {
		h.Peers.Typing(to, topic.InboxOf(to), signal)
	}
	if pk.FixedHeader.Qos > 0 {
		pid := pk.PacketID
		h.Queue.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
			s.w.Puback(pid, 0)
			s.w.Flush(false)
		}})
	}
}

// Delivered queues delivered receipts to the senders of messages a device
// of user acknowledged, one receipt per sender with all its ids.
func (h *Inbox) Delivered(user string, metas [][]byte) {
	var senders []string
	ids := make(map[string][]string)
	for _, m := range metas {
		from, _, id, ok := envelope.ParseMeta(m)
		if !ok {
			continue
		}
		if _, seen := ids[from]; !seen {
			senders = append(senders, from)
		}
		ids[from] = append(ids[from], id)
	}
	ts := time.Now().UnixMilli()
	for _, from := range senders {
		h.Queue.Append(&queue.Request{
			To:   from,
			Data: envelope.Receipt("delivered", user, ids[from], ts),
			Done: func(st queue.Status, _ queue.Message, err error) {
				if st == queue.Failed || st == queue.Full {
					h.Log.Warn("delivered receipt not queued", "to", from, "status", int(st), "error", err)
				}
			},
		})
	}
}
