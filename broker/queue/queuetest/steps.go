package queuetest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// The steps of a run: each event as the message path sees it, and the
// checks of the store and the deliveries against the model.

// publish appends one message (a fresh id, or a resend of one of the
// sender's earlier ids) and checks the outcome against the model.
func (r *runner) publish(from string, to []string, group, resend bool) error {
	var s *sent
	if olds := r.sent[from]; resend && len(olds) > 0 && !olds[len(olds)-1].erased {
		s = olds[len(olds)-1]
		to = s.to
	} else {
		s = &sent{id: fmt.Sprintf("m%d", len(olds)+1), group: group, to: to, copies: make(map[string]bool)}
		r.sent[from] = append(r.sent[from], s)
	}
	r.attempt++
	attempt := r.attempt
	payload := func(u string) string { return fmt.Sprintf("a%d>%s", attempt, u) }
	req := &queue.Request{Sender: from, ID: s.id}
	if s.group {
		for _, u := range to {
			req.Fanout = append(req.Fanout, queue.Fanout{To: u, Data: []byte(payload(u))})
		}
	} else {
		req.To, req.Data = to[0], []byte(payload(to[0]))
	}
	var full []string
	req.OnFull = func(users []string) { full = slices.Clone(users) }
	type result struct {
		st  queue.Status
		err error
	}
	done := make(chan result, 1)
	req.Done = func(st queue.Status, _ queue.Message, err error) { done <- result{st, err} }
	must, may := make(map[string]int), make(map[string]int)
	for _, u := range to {
		must[u], may[u] = r.queueBounds(u)
	}
	r.mu.Lock()
	r.notices = nil
	r.mu.Unlock()
	req.OnStored = r.onStored
	r.store.Append(req)
	res := <-done
	// A barrier: the notifications of req all come before the next Done.
	barrier := make(chan struct{})
	r.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) { close(barrier) }})
	<-barrier
	r.mu.Lock()
	notices := r.notices
	r.notices = nil
	r.mu.Unlock()

	got := make(map[string]queue.Message)
	for _, n := range notices {
		if _, dup := got[n.user]; dup {
			return fmt.Errorf("two copies of one message for %s", n.user)
		}
		if string(n.m.Data) != payload(n.user) {
			return fmt.Errorf("notification for %s carries %q, want %q", n.user, n.m.Data, payload(n.user))
		}
		got[n.user] = n.m
	}
	switch {
	case res.st == queue.Failed:
		return fmt.Errorf("append failed: %w", res.err)
	case res.st == queue.Duplicate && len(s.copies) == 0:
		return fmt.Errorf("a duplicate of %s/%s, which was never stored", from, s.id)
	case res.st != queue.Stored && len(got) > 0:
		return fmt.Errorf("status %v but %d copies stored", res.st, len(got))
	case res.st == queue.Stored && len(got) == 0:
		return fmt.Errorf("status Stored but no copy stored")
	case res.st != queue.Stored && len(full) > 0:
		return fmt.Errorf("OnFull called for a request of status %v", res.st)
	}
	hadCopies := len(s.copies) > 0
	for _, u := range to {
		m, stored := got[u]
		named := slices.Contains(full, u)
		switch {
		case stored && s.copies[u]:
			return fmt.Errorf("resend of %s/%s stored a second copy for %s", from, s.id, u)
		case stored && hadCopies && !r.b.DedupPerRecipient:
			return fmt.Errorf("resend of %s/%s stored for %s: the whole request is a duplicate", from, s.id, u)
		case stored && must[u] >= r.q.MaxQueueMessages:
			return fmt.Errorf("stored for %s beyond max_queue_messages: %d messages must be kept", u, must[u])
		case stored && named:
			return fmt.Errorf("stored for %s, and OnFull named it", u)
		case stored:
			s.copies[u] = true
			r.addMessage(u, m)
		case res.st == queue.Stored && !s.copies[u] && !named:
			return fmt.Errorf("no copy for %s and OnFull did not name it (named %v)", u, full)
		case (named || res.st == queue.Full && !s.copies[u]) && may[u] < r.q.MaxQueueMessages:
			return fmt.Errorf("%s refused as full, but its queue holds at most %d of %d", u, may[u], r.q.MaxQueueMessages)
		}
	}
	return nil
}

// queueBounds returns how many messages of user's queue the store must
// still hold against max_queue_messages (stored, not expired, not yet
// released) and how many it may hold (stored, not seen deleted, and not
// certainly skipped as expired).
func (r *runner) queueBounds(user string) (must, may int) {
	for _, m := range r.msgs[user] {
		if !m.released && !r.maybeExpired(m) {
			must++
		}
		if !m.gone && (r.b.ExpiredCountTowardsCap || !r.surelyExpired(m)) {
			may++
		}
	}
	return must, may
}

// surelyExpired reports a message past message_ttl by more than the
// store's rounding.
func (r *runner) surelyExpired(m *mmsg) bool {
	return !r.clock.Now().Before(m.stored.Add(r.q.MessageTTL + time.Second))
}

// addMessage records a stored copy and who must get it.
func (r *runner) addMessage(user string, m queue.Message) {
	mm := &mmsg{user: user, seq: m.Seq, payload: string(m.Data), stored: r.clock.Now(),
		holders: make(map[string]bool), acked: make(map[string]bool)}
	noPersistent := !r.hasPersistent(user)
	for name, d := range r.users[user] {
		if d.registered {
			mm.holders[name] = true
		}
	}
	_ = noPersistent
	r.mu.Lock()
	mm.faulted = r.faulted[fmt.Sprintf("%s/%d", user, m.Seq)]
	r.mu.Unlock()
	if n := len(r.msgs[user]); n > 0 && r.msgs[user][n-1].seq >= m.Seq {
		r.t.Logf("note: %s's message %d stored after %d", user, m.Seq, r.msgs[user][n-1].seq)
	}
	i, _ := slices.BinarySearchFunc(r.msgs[user], m.Seq, func(x *mmsg, s uint64) int { return cmpU(x.seq, s) })
	r.msgs[user] = slices.Insert(r.msgs[user], i, mm)
	r.byPay[mm.payload] = mm
}

func cmpU(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// connect opens a connection of a device: a new one, or a takeover of
// its current connection, with the old one ending before or after.
func (r *runner) connect(user, name string, transient, oldEndsFirst bool) error {
	d := r.device(user, name)
	may, err := r.store.MayAttach(user, name)
	if err != nil {
		return fmt.Errorf("may attach: %w", err)
	}
	want := d.registered || r.registered(user) < r.q.MaxDevices
	if may != want {
		return fmt.Errorf("MayAttach(%s/%s) = %v, want %v (%d devices registered)", user, name, may, want, r.registered(user))
	}
	if !may {
		return nil
	}
	old := d.sess
	if old != nil && oldEndsFirst {
		r.end(user, d, old)
		old = nil
		d.sess = nil
	}
	_, subscribed, err := r.store.Attach(user, name, transient)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	if subscribed && !d.subscribedOnce {
		return fmt.Errorf("%s/%s attached as subscribed, but it never subscribed", user, name)
	}
	if !d.registered {
		// A device new to the store: the whole backlog when the user has no
		// persistent device, what comes from now on otherwise.
		if !r.hasPersistent(user) {
			for _, m := range r.msgs[user] {
				if !m.released {
					m.holders[name] = true
				}
			}
		}
		d.registered, d.persistent = true, !transient
		d.cursor, d.flushed, d.subscribedOnce = 0, 0, false
	} else if !transient && !d.persistent {
		// A transient device becoming persistent has its record, cursor
		// included, written at once; if it is the user's first persistent
		// device, it gets the backlog too.
		if !r.hasPersistent(user) {
			for _, m := range r.msgs[user] {
				if !m.released {
					m.holders[name] = true
					delete(m.acked, name)
				}
			}
			d.cursor = 0
		}
		d.persistent = true
		d.flushed = d.cursor
	}
	d.online++
	d.lastSeen = r.clock.Now()
	d.sess = &msess{sink: &sink{}, pids: make(map[uint16]uint64), acked: make(map[uint64]bool)}
	if subscribed {
		if err := r.start(user, d); err != nil {
			return err
		}
	}
	if old != nil {
		r.end(user, d, old)
	}
	return nil
}

// subscribe starts feeding a connected device, from its cursor.
func (r *runner) subscribe(user, name string) error {
	d := r.users[user][name]
	if d == nil || d.sess == nil || d.sess.dev != nil {
		return nil
	}
	r.store.SetSubscribed(user, name, true)
	d.subscribedOnce = true
	return r.start(user, d)
}

func (r *runner) start(user string, d *mdev) error {
	cursor, err := r.store.Cursor(user, d.name)
	if err != nil {
		return fmt.Errorf("cursor of %s/%s: %w", user, d.name, err)
	}
	dev, err := r.dlv.Start(user, d.name, cursor, window, d.sess.sink)
	if err != nil {
		return fmt.Errorf("start delivery to %s/%s: %w", user, d.name, err)
	}
	d.sess.dev = dev
	return nil
}

// end ends one connection of a device, as the inbox hook does.
func (r *runner) end(user string, d *mdev, s *msess) {
	if s.dev != nil {
		r.dlv.Stop(s.dev)
		s.dev = nil
	}
	r.store.Detach(user, d.name)
	d.online = max(d.online-1, 0)
	if d.online > 0 {
		return
	}
	d.lastSeen = r.clock.Now()
	if !d.persistent {
		r.unregister(user, d)
	}
}

// remove removes a device as its user does over HTTP: the store forgets
// it, then its connection is closed (whose Detach finds no device), and
// the store's list of the user's devices is the model's.
func (r *runner) remove(user, name string) error {
	d := r.users[user][name]
	err := r.store.Remove(user, name)
	if d == nil || !d.registered {
		if !errors.Is(err, queue.ErrUnknownDevice) {
			return fmt.Errorf("Remove(%s/%s) of an unknown device = %v, want ErrUnknownDevice", user, name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s/%s: %w", user, name, err)
	}
	// The removal ran a flush.
	r.flushed()
	if d.sess != nil {
		r.end(user, d, d.sess)
		d.sess = nil
	}
	d.online = 0
	r.unregister(user, d)
	listed, err := r.store.Devices(user)
	if err != nil {
		return fmt.Errorf("devices of %s: %w", user, err)
	}
	var got, want []string
	for _, l := range listed {
		got = append(got, l.Name)
	}
	for _, n := range sortedDevices(r.users[user]) {
		if r.users[user][n].registered {
			want = append(want, n)
		}
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("devices of %s after removing %s: %v, want %v", user, name, got, want)
	}
	return nil
}

// erase erases a user as the server API does: the store forgets its
// devices, messages and dedup keys, then the connections of the devices
// it named are closed. Nothing of the user is left to read, and what
// the user sent is never resent (its ids may be free again).
func (r *runner) erase(user string) error {
	names, err := r.store.Erase(user)
	if err != nil {
		return fmt.Errorf("erase %s: %w", user, err)
	}
	// What the erase's removals deleted as acknowledged is checked while
	// the model still has the user.
	if err := r.checkTold(); err != nil {
		return err
	}

	var want []string
	for _, n := range sortedDevices(r.users[user]) {
		if r.users[user][n].registered {
			want = append(want, n)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, want) {
		return fmt.Errorf("erase %s forgot devices %v, want %v", user, names, want)
	}
	r.flushed()
	for _, d := range r.users[user] {
		for _, s := range []*msess{d.old, d.sess} {
			if s != nil {
				r.end(user, d, s)
			}
		}
		d.sess, d.old, d.online = nil, nil, 0
		r.unregister(user, d)
		d.cursor, d.flushed, d.subscribedOnce = 0, 0, false
	}
	for _, m := range r.msgs[user] {
		delete(r.byPay, m.payload)
	}
	r.msgs[user] = nil
	for _, s := range r.sent[user] {
		s.erased = true
	}
	r.mu.Lock()
	r.late = slices.DeleteFunc(r.late, func(n notice) bool { return n.user == user })
	r.mu.Unlock()
	if left, err := r.store.Read(user, 0, 10000); err != nil || len(left) > 0 {
		return fmt.Errorf("after erasing %s its queue holds %d messages (%v)", user, len(left), err)
	}
	if devs, err := r.store.Devices(user); err != nil || len(devs) > 0 {
		return fmt.Errorf("after erasing %s it has devices %v (%v)", user, devs, err)
	}
	return nil
}

// unregister forgets a device: it no longer holds anything back.
func (r *runner) unregister(user string, d *mdev) {
	d.registered, d.persistent = false, false
	for _, m := range r.msgs[user] {
		delete(m.holders, d.name)
		delete(m.acked, d.name)
	}
}

// ack acknowledges what mask picks of a connection's unacknowledged
// deliveries (all of them for 0), in the order they were sent.
func (r *runner) ack(user, name string, mask byte) error {
	d := r.users[user][name]
	if d == nil || d.sess == nil || d.sess.dev == nil {
		return nil
	}
	if err := r.drain(user, d, d.sess); err != nil {
		return err
	}
	s := d.sess
	var keep []uint16
	for i, pid := range s.unacked {
		if mask != 0 && mask&(1<<(i%8)) == 0 {
			keep = append(keep, pid)
			continue
		}
		seq := s.pids[pid]
		delete(s.pids, pid)
		r.dlv.Acked(s.dev, pid)
		s.acked[seq] = true
		if m := r.msgAt(user, seq); m != nil {
			m.acked[name] = true
		}
	}
	s.unacked = keep
	// The cursor delivery moves: the acknowledged prefix of what was sent.
	for _, seq := range s.seqs {
		if seq <= d.cursor {
			continue
		}
		if !s.acked[seq] {
			break
		}
		d.cursor = seq
	}
	return nil
}

func (r *runner) msgAt(user string, seq uint64) *mmsg {
	ms := r.msgs[user]
	i, ok := slices.BinarySearchFunc(ms, seq, func(x *mmsg, s uint64) int { return cmpU(x.seq, s) })
	if !ok {
		return nil
	}
	return ms[i]
}

// drain takes what delivery wrote to a connection since the last look
// and checks it: known messages, in order, within the window, and not
// one acknowledged before (but after a crash, or across a gap).
func (r *runner) drain(user string, d *mdev, s *msess) error {
	for _, p := range s.sink.since(s.seen) {
		s.seen++
		m := r.byPay[p.payload]
		if m == nil || m.user != user {
			return fmt.Errorf("%s/%s got %q, which is not one of its user's messages", user, d.name, p.payload)
		}
		if _, busy := s.pids[p.pid]; busy {
			return fmt.Errorf("%s/%s got packet ID %d while it is in flight", user, d.name, p.pid)
		}
		if len(s.unacked) >= window {
			return fmt.Errorf("%s/%s got a message beyond its window of %d", user, d.name, window)
		}
		if m.seq <= s.last && !m.faulted {
			return fmt.Errorf("%s/%s got message %d after %d: out of order", user, d.name, m.seq, s.last)
		}
		if m.seq <= d.cursor && !r.b.Sparse {
			return fmt.Errorf("%s/%s got message %d again after acknowledging up to %d", user, d.name, m.seq, d.cursor)
		}
		s.last = max(s.last, m.seq)
		s.seqs = append(s.seqs, m.seq)
		s.pids[p.pid] = m.seq
		s.unacked = append(s.unacked, p.pid)
	}
	return nil
}

// forgetUnseen mirrors the sweep: offline devices unseen for device_ttl
// are forgotten, connected ones are seen now.
func (r *runner) forgetUnseen() {
	now := r.clock.Now()
	before := now.Add(-r.q.DeviceTTL)
	for user, devs := range r.users {
		for _, d := range devs {
			switch {
			case d.online > 0:
				// The sweep marks connected devices seen.
				d.lastSeen = now
			case d.registered && d.lastSeen.Before(before):
				r.unregister(user, d)
			}
		}
	}
}

// flushed notes that every cursor is persisted.
func (r *runner) flushed() {
	for _, devs := range r.users {
		for _, d := range devs {
			d.flushed = d.cursor
		}
	}
}

// crash crashes the store and delivery and reopens them: connections are
// gone without a Detach, cursors are back to their last flush, and a
// transient device is gone (or, where its record is shared, offline).
func (r *runner) crash() error {
	r.dlv.Close()
	if err := r.b.Crash(r.store); err != nil {
		return fmt.Errorf("crash: %w", err)
	}
	r.mu.Lock()
	r.late = nil
	r.fault = 0
	clear(r.lost) // a restarted node reads every queue it feeds
	r.mu.Unlock()
	for user, devs := range r.users {
		// Acknowledgements past the last flush are lost, and with them the
		// right to delete what they released.
		for _, m := range r.msgs[user] {
			if m.gone {
				continue
			}
			m.released = false
			for name := range m.acked {
				if d := devs[name]; d == nil || m.seq > d.flushed {
					delete(m.acked, name)
				}
			}
		}
		for _, d := range devs {
			d.sess, d.old = nil, nil
			d.online = 0
			d.cursor = d.flushed
			if d.registered && !d.persistent && !r.b.TransientSurvivesCrash {
				r.unregister(user, d)
			}
		}
	}
	r.open()
	return nil
}

// releaseLate passes the delayed notifications on, newest first, and
// resyncs delivery when some were lost, as the peers bus does when it
// sees a gap in a peer's notices.
func (r *runner) releaseLate() {
	r.mu.Lock()
	late := r.late
	r.late = nil
	lost := len(r.lost) > 0
	clear(r.lost)
	dlv := r.dlv
	r.mu.Unlock()
	for i := len(late) - 1; i >= 0; i-- {
		dlv.Stored(late[i].user, late[i].m)
	}
	if lost {
		dlv.Resync()
	}
}

// noticePending reports a message whose notification the test holds back
// or lost and has not made up for: delivery need not have found it yet.
func (r *runner) noticePending(m *mmsg) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.late {
		if n.user == m.user && n.m.Seq == m.seq {
			return true
		}
	}
	return r.lost[fmt.Sprintf("%s/%d", m.user, m.seq)]
}

// settleTimeout bounds how long delivery may take to bring every online
// device what it must get; shrinking, which replays a failure many
// times, waits less.
const (
	settleTimeout       = 10 * time.Second
	shrinkSettleTimeout = time.Second
)

// settle acknowledges everything delivered until every subscribed
// connection has acknowledged every message it must get.
func (r *runner) settle() error {
	deadline := time.Now().Add(r.settleTimeout)
	for {
		missing, err := r.settleOnce()
		if err != nil || missing == "" {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not delivered within %v: %s", r.settleTimeout, missing)
		}
		time.Sleep(time.Millisecond)
	}
}

// settleOnce acknowledges what is in flight and says what is missing.
func (r *runner) settleOnce() (string, error) {
	var missing []string
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			d := r.users[user][name]
			if d.sess == nil || d.sess.dev == nil {
				continue
			}
			if err := r.ack(user, name, 0); err != nil {
				return "", err
			}
			for _, m := range r.msgs[user] {
				if m.holders[name] && !m.acked[name] && !r.maybeExpired(m) && !r.noticePending(m) {
					missing = append(missing, fmt.Sprintf("%s/%s lacks %d", user, name, m.seq))
				}
			}
		}
	}
	return strings.Join(missing, ", "), nil
}

func sortedUsers(m map[string]map[string]*mdev) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func sortedDevices(m map[string]*mdev) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// touched returns the users whose queues e may change; nil means all.
// Only they are read back after e: only a flush deletes, and an event
// on one user's devices changes no other queue.
func (r *runner) touched(e event) []string {
	switch e.op {
	case opDirect:
		return []string{userName(e.a), userName(e.b)}
	case opGroup:
		return nil
	case opConnect, opSubscribe, opUnsubscribe, opAck, opDisconnect:
		return []string{userName(e.a)}
	}
	return nil
}

// check brings the model's releases up to date and checks the store's
// contents for users (all when none are given): nothing a device must
// still get is deleted, and nothing is there that was never stored.
func (r *runner) check(users ...string) error {
	if err := r.checkTold(); err != nil {
		return err
	}
	if len(users) == 0 {
		users = sortedUsers(r.users)
	}
	for _, user := range users {
		d := r.users[user]
		for _, name := range sortedDevices(d) {
			if s := d[name].sess; s != nil {
				if err := r.drain(user, d[name], s); err != nil {
					return err
				}
			}
		}
		r.release(user)
		present, err := r.store.Read(user, 0, 10000)
		if err != nil {
			return fmt.Errorf("read %s: %w", user, err)
		}
		have := make(map[uint64]bool, len(present))
		for _, p := range present {
			m := r.msgAt(user, p.Seq)
			if m == nil {
				return fmt.Errorf("%s's queue holds message %d, which was never stored", user, p.Seq)
			}
			if m.gone {
				return fmt.Errorf("%s's message %d is back after it was deleted", user, p.Seq)
			}
			have[p.Seq] = true
		}
		for _, m := range r.msgs[user] {
			if have[m.seq] || r.maybeExpired(m) || m.gone {
				continue
			}
			if !m.released {
				return fmt.Errorf("%s's message %d was deleted, but %s", user, m.seq, r.waitingFor(m))
			}
			m.gone = true
		}
	}
	return nil
}

// checkTold checks what the store said it deleted as acknowledged by
// every device: only messages the model released, each once.
func (r *runner) checkTold() error {
	r.mu.Lock()
	told := r.told
	r.told = nil
	r.mu.Unlock()
	for _, n := range told {
		key := fmt.Sprintf("%s/%d", n.user, n.m.Seq)
		// Badger numbers a user's queue from 1 again once it is empty and
		// has no device: of the messages at that sequence, the one still
		// stored (not seen gone) and not told of before.
		var m *mmsg
		for _, c := range r.msgs[n.user] {
			if c.seq == n.m.Seq && (m == nil || m.gone && !c.gone) {
				m = c
			}
		}
		if m == nil {
			return fmt.Errorf("the store told of deleting %s, which was never stored", key)
		}
		r.release(n.user)
		if !m.released {
			return fmt.Errorf("the store told of deleting %s as acknowledged, but %s", key, r.waitingFor(m))
		}
		if r.toldBefore[m] {
			return fmt.Errorf("the store told twice of deleting %s", key)
		}
		r.toldBefore[m] = true
	}
	return nil
}

// release marks the messages of user the store may now delete: the user
// has a persistent device and every registered holder acknowledged them.
func (r *runner) release(user string) {
	if !r.hasPersistent(user) {
		return
	}
	for _, m := range r.msgs[user] {
		if m.released {
			continue
		}
		done := true
		for name := range m.holders {
			if r.users[user][name].registered && !m.acked[name] {
				done = false
				break
			}
		}
		m.released = done
	}
}

func (r *runner) waitingFor(m *mmsg) string {
	if !r.hasPersistent(m.user) {
		return "the user has no persistent device yet"
	}
	var w []string
	for name := range m.holders {
		if !m.acked[name] {
			w = append(w, name)
		}
	}
	slices.Sort(w)
	return "it is not acknowledged by " + strings.Join(w, ", ")
}

// finish connects every registered persistent device, delivers and
// acknowledges everything, disconnects, flushes, and checks that every
// device got what it must, that nothing released is left behind, and
// that the store keeps no user in memory.
func (r *runner) finish() error {
	r.releaseLate()
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			d := r.users[user][name]
			if !d.registered {
				continue
			}
			if d.sess == nil {
				if err := r.connect(user, name, !d.persistent, false); err != nil {
					return err
				}
			}
			if err := r.subscribe(user, name); err != nil {
				return err
			}
		}
	}
	if err := r.settle(); err != nil {
		return err
	}
	if err := r.check(); err != nil {
		return err
	}
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			if d := r.users[user][name]; d.sess != nil {
				r.end(user, d, d.sess)
				d.sess = nil
			}
		}
	}
	deadline := time.Now().Add(r.settleTimeout)
	for {
		if err := r.store.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		if err := r.check(); err != nil {
			return err
		}
		r.store.EvictIdle()
		left := r.leftBehind()
		if left == "" && r.store.Loaded() == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if left == "" {
				return fmt.Errorf("%d users kept in memory with no device connected and everything flushed", r.store.Loaded())
			}
			return fmt.Errorf("left behind after every device acknowledged: %s", left)
		}
		time.Sleep(time.Millisecond)
	}
}

// leftBehind lists the messages the store still holds of users who have
// a persistent device, all of whose devices acknowledged everything.
func (r *runner) leftBehind() string {
	var left []string
	for _, user := range sortedUsers(r.users) {
		if !r.hasPersistent(user) {
			continue
		}
		for _, m := range r.msgs[user] {
			if !m.gone && !r.maybeExpired(m) {
				left = append(left, fmt.Sprintf("%s/%d", user, m.seq))
			}
		}
	}
	return strings.Join(left, ", ")
}
