package msgpath

import (
	"errors"
	"fmt"

	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/groups"
)

// MaxSendRecipients caps the recipients of one Send.
const MaxSendRecipients = 1000

// Send is a message a backend sends through the server API (PROTOCOL.md
// section 7): to users' inboxes or to a group's members, from a sender
// the server names.
type Send struct {
	// From names the sender: a user ID such as "system" or a bot's.
	From string
	// To lists the recipients of a direct message, at most MaxSendRecipients.
	To []string
	// Group, instead of To, sends to every member of a group.
	Group string
	// Message is the message object, checked like a client's publish;
	// its id is the idempotency key, per sender.
	Message []byte
}

// SendResult is the outcome of a Send for one recipient.
type SendResult struct {
	// To is the recipient.
	To string
	// Status is what the store did for it: Stored, Duplicate (the id
	// was sent before within the dedup window), Full or Failed.
	Status queue.Status
	// Err says why, when Status is Failed.
	Err error
}

// SendError is a Send refused before anything was stored.
type SendError struct {
	// Code is a protocol error code (section 5).
	Code string
	// Reason says why, for people.
	Reason string
}

func (e *SendError) Error() string { return e.Code + ": " + e.Reason }

// Send checks m and stores it for every recipient in one commit, under
// one dedup key (From and the message's id), then calls done with the
// message id, its server timestamp and one result per recipient, on the
// store's goroutine (it must not block). A refused m is a *SendError, and
// done is not called. Like Publish it blocks only while the committer is
// saturated.
func (p *Path) Send(m Send, done func(id string, ts int64, results []SendResult)) error {
	if !topic.ValidUser(m.From) {
		return &SendError{CodeBadPayload, fmt.Sprintf("from %q is not a user ID", m.From)}
	}
	to, err := p.sendRecipients(m)
	if err != nil {
		return err
	}
	id, err := envelope.Validate(m.Message, p.limits.maxMessageBytes)
	switch {
	case errors.Is(err, envelope.ErrTooLarge):
		return &SendError{CodeTooLarge, err.Error()}
	case err != nil:
		return &SendError{CodeBadPayload, err.Error()}
	}
	ts := p.now().UnixMilli()
	r := &queue.Request{
		To: to[0], Sender: envelope.ServerSenderKey(m.From), ID: id, Meta: envelope.ServerMeta(m.From, m.Group, id),
		Data:     envelope.ServerMessage(m.From, to[0], m.Group, ts, m.Message),
		OnStored: p.notify,
	}
	for _, u := range to[1:] {
		r.Fanout = append(r.Fanout, queue.Fanout{To: u, Data: envelope.ServerMessage(m.From, u, m.Group, ts, m.Message)})
	}
	var full map[string]bool
	r.OnFull = func(users []string) {
		full = make(map[string]bool, len(users))
		for _, u := range users {
			full[u] = true
		}
	}
	r.Done = func(st queue.Status, _ queue.Message, err error) {
		results := make([]SendResult, len(to))
		for i, u := range to {
			results[i] = SendResult{To: u, Status: st, Err: err}
			if st == queue.Stored && full[u] {
				results[i].Status = queue.Full
			}
		}
		done(id, ts, results)
	}
	p.store.Append(r)
	return nil
}

// sendRecipients returns the recipients of m, checked and without repeats.
func (p *Path) sendRecipients(m Send) ([]string, error) {
	var to []string
	switch {
	case m.Group != "" && len(m.To) > 0:
		return nil, &SendError{CodeBadPayload, "give recipients or a group, not both"}
	case m.Group != "":
		g, err := p.groups.Get(m.Group)
		switch {
		case errors.Is(err, groups.ErrUnknown):
			return nil, &SendError{CodeUnknownGroup, fmt.Sprintf("no group %q", m.Group)}
		case err != nil:
			return nil, fmt.Errorf("read group %s: %w", m.Group, err)
		}
		to = g.Members
	default:
		to = m.To
	}
	if len(to) == 0 {
		return nil, &SendError{CodeBadPayload, "no recipient"}
	}
	if len(to) > MaxSendRecipients {
		return nil, &SendError{CodeBadPayload, fmt.Sprintf("%d recipients, at most %d", len(to), MaxSendRecipients)}
	}
	seen := make(map[string]bool, len(to))
	out := make([]string, 0, len(to))
	for _, u := range to {
		if !topic.ValidUser(u) {
			return nil, &SendError{CodeBadPayload, fmt.Sprintf("recipient %q is not a user ID", u)}
		}
		if !seen[u] {
			seen[u] = true
			out = append(out, u)
		}
	}
	return out, nil
}
