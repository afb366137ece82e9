package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/loadtest/workload"
)

// workloadRun plays a workload: each user a goroutine that comes online
// and goes away in sessions and, while online, acts at random from its
// phase's mix. Then every user comes online to collect what it is owed.
type workloadRun struct {
	r      *run
	spec   *workload.Spec
	book   *book
	users  []*wlUser
	groups []wlGroup
	api    string
	http   *http.Client
	// bounds are when each phase starts and ends, from the run's start.
	bounds []time.Duration
	start  time.Time
	// connecting bounds the sessions being opened at once.
	connecting chan struct{}
	// media is the bytes every upload sends.
	media []byte
	text  string
}

// wlGroup is a group created for the run.
type wlGroup struct {
	id      string
	members []int
}

// wlUser is one simulated user with one device. Its goroutine owns mc
// and rng; the MQTT client's handler reads the rest under mu or atomically.
type wlUser struct {
	w        *workloadRun
	idx      int
	id       string
	token    string
	contacts []int
	watch    []int
	groups   []int
	rng      *rand.Rand
	n        uint64
	mc       mqtt.Client
	online   atomic.Bool

	mu sync.Mutex
	// unread lists, by sender, the ids of messages received and not yet
	// marked read.
	unread map[int][]string
}

// runWorkload runs the workload scenario.
func (r *run) runWorkload(ctx context.Context) error {
	spec := r.cfg.Workload
	w := &workloadRun{
		r:          r,
		spec:       spec,
		book:       r.book,
		api:        strings.TrimSuffix(r.cfg.API, "/"),
		http:       &http.Client{Timeout: r.cfg.ConnectTimeout, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: connectWorkers}},
		bounds:     spec.Bounds(r.cfg.Duration),
		connecting: make(chan struct{}, connectWorkers),
		media:      bytes.Repeat([]byte{0xa5}, max(1, spec.MediaSize)),
		text:       strings.Repeat("x", spec.MessageSize),
	}
	defer w.http.CloseIdleConnections()
	rng := rand.New(rand.NewPCG(r.seed(), 0))
	w.makeUsers(rng)
	r.setPhase(phaseConnect)
	if err := w.makeGroups(ctx, rng); err != nil {
		return err
	}

	// The run starts in the first phase's steady state, its users
	// connected before anyone acts: a connection storm would otherwise
	// weigh on the first messages' latency.
	var wg sync.WaitGroup
	for _, u := range w.users {
		if u.rng.Float64() < spec.Phases[0].Online() {
			wg.Go(func() { u.connect(ctx) })
		}
	}
	wg.Wait()

	r.setPhase(phaseSend)
	w.start = time.Now()
	actCtx, cancel := context.WithTimeout(ctx, r.cfg.Duration)
	defer cancel()
	for _, u := range w.users {
		wg.Go(func() { u.live(actCtx) })
	}
	wg.Wait()

	// What the online users are owed arrives first, before the offline
	// users come back for theirs, whose connections would weigh on the
	// latency of the last messages.
	r.setPhase(phaseGrace)
	deadline := time.Now().Add(r.cfg.Grace)
	online := func(i int) bool { return w.users[i].online.Load() }
	for w.book.outstandingTo(online) > 0 && time.Now().Before(deadline) && sleep(ctx, 50*time.Millisecond) {
	}
	for _, u := range w.users {
		if !u.online.Load() {
			wg.Go(func() { u.connect(ctx) })
		}
	}
	wg.Wait()
	all := func(int) bool { return true }
	for w.book.outstandingTo(all) > 0 && time.Now().Before(deadline) && sleep(ctx, 50*time.Millisecond) {
	}
	for _, u := range w.users {
		u.disconnect()
	}
	r.workload = &WorkloadResult{Name: spec.Name, Speed: r.cfg.Speed, Groups: len(w.groups), GroupSize: spec.Groups.Size}
	for i, p := range spec.Phases {
		r.workload.Phases = append(r.workload.Phases, PhaseResult{Name: p.Name, StartSec: w.bounds[i].Seconds(), EndSec: w.bounds[i+1].Seconds()})
	}
	return nil
}

// makeUsers draws every user's contacts, in a fixed order from the seed.
func (w *workloadRun) makeUsers(rng *rand.Rand) {
	r := w.r
	n := len(r.users)
	for i, id := range r.users {
		u := &wlUser{w: w, idx: i, id: id, rng: rand.New(rand.NewPCG(r.seed(), uint64(i)+1)), unread: make(map[int][]string)}
		for _, c := range rng.Perm(n - 1)[:min(w.spec.Contacts, n-1)] {
			if c >= i {
				c++
			}
			u.contacts = append(u.contacts, c)
		}
		u.watch = u.contacts[:min(w.spec.PresenceWatch, len(u.contacts))]
		w.users = append(w.users, u)
	}
}

// makeGroups creates the workload's groups over the HTTP API, each by
// its first member.
func (w *workloadRun) makeGroups(ctx context.Context, rng *rand.Rand) error {
	count := w.spec.Groups.Count(len(w.users))
	if !w.spec.Uses(workload.Group) {
		count = 0
	}
	size := min(w.spec.Groups.Size, len(w.users))
	for g := range count {
		gr := wlGroup{id: fmt.Sprintf("%s-g%d", w.r.tag, g), members: rng.Perm(len(w.users))[:size]}
		body, err := json.Marshal(map[string]any{"id": gr.id, "members": w.names(gr.members)})
		if err != nil {
			return fmt.Errorf("group %s: %w", gr.id, err)
		}
		if _, err := w.call(ctx, w.users[gr.members[0]], http.MethodPost, "/v1/groups", "application/json", body); err != nil {
			return fmt.Errorf("create group %s: %w", gr.id, err)
		}
		for _, m := range gr.members {
			w.users[m].groups = append(w.users[m].groups, len(w.groups))
		}
		w.groups = append(w.groups, gr)
	}
	return nil
}

func (w *workloadRun) names(idxs []int) []string {
	out := make([]string, len(idxs))
	for i, x := range idxs {
		out[i] = w.users[x].id
	}
	return out
}

// call makes an HTTP API call as user u and returns the answer's body.
func (w *workloadRun) call(ctx context.Context, u *wlUser, method, path, contentType string, body []byte) ([]byte, error) {
	tok, err := u.tokenFor()
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, w.api+path, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", contentType)
	resp, err := w.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("%s %s: %s %s", method, path, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// tokenFor returns the user's access token, minted once.
func (u *wlUser) tokenFor() (string, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.token == "" {
		c := u.w.r.cfg
		tok, err := token.Mint(c.Secret, u.id, c.Duration+c.Grace+time.Hour)
		if err != nil {
			return "", fmt.Errorf("token for %s: %w", u.id, err)
		}
		u.token = tok
	}
	return u.token, nil
}

// phase returns the index of the phase at time t of the run.
func (w *workloadRun) phase(t time.Time) int {
	d := t.Sub(w.start)
	for i := range w.spec.Phases {
		if d < w.bounds[i+1] {
			return i
		}
	}
	return len(w.spec.Phases) - 1
}

// exp draws an exponential duration of the given mean, sped up by
// Config.Speed.
func (u *wlUser) exp(mean time.Duration) time.Duration {
	return time.Duration(u.rng.ExpFloat64() * float64(mean) / u.w.r.cfg.Speed)
}

// live runs the user until ctx ends: sessions and, in each, actions. A
// phase change draws the pending times again from the new phase, which
// exponential times allow (they have no memory).
func (u *wlUser) live(ctx context.Context) {
	w := u.w
	ph := -1
	var switchAt, actAt time.Time
	for {
		now := time.Now()
		if p := w.phase(now); p != ph {
			ph = p
			switchAt = now.Add(u.stateTime(w.spec.Phases[ph]))
			actAt = now.Add(u.exp(w.spec.Phases[ph].Think))
		}
		spec := w.spec.Phases[ph]
		wake := switchAt
		if u.online.Load() && actAt.Before(wake) {
			wake = actAt
		}
		if end := w.start.Add(w.bounds[ph+1]); end.Before(wake) {
			wake = end
		}
		if !sleep(ctx, time.Until(wake)) {
			return
		}
		now = time.Now()
		switch {
		case !now.Before(switchAt):
			if u.online.Load() {
				u.disconnect()
			} else if !u.connect(ctx) {
				return
			}
			switchAt = now.Add(u.stateTime(spec))
			actAt = now.Add(u.exp(spec.Think))
		case u.online.Load() && !now.Before(actAt):
			u.act(ctx, spec)
			actAt = time.Now().Add(u.exp(spec.Think))
		}
	}
}

// stateTime draws how long the user stays in its present state.
func (u *wlUser) stateTime(p workload.Phase) time.Duration {
	if u.online.Load() {
		return u.exp(p.Session)
	}
	return u.exp(p.Offline)
}

// connect opens a session and subscribes to the user's inbox and the
// presence of the contacts it watches; it returns false once ctx ended.
func (u *wlUser) connect(ctx context.Context) bool {
	w := u.w
	select {
	case w.connecting <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	defer func() { <-w.connecting }()
	start := time.Now()
	mc, err := u.newClient()
	if err == nil {
		tok := mc.Connect()
		if !tok.WaitTimeout(w.r.cfg.ConnectTimeout) {
			err = fmt.Errorf("connect %s: no CONNACK within %s", u.id, w.r.cfg.ConnectTimeout)
		} else if err = tok.Error(); err != nil {
			err = fmt.Errorf("connect %s: %w", u.id, err)
		}
	}
	if err == nil {
		err = u.subscribe(mc)
	}
	if err != nil {
		w.book.connected(-1)
		w.r.errs.add(err)
		if mc != nil {
			mc.Disconnect(0)
		}
		return ctx.Err() == nil
	}
	u.mc = mc
	u.online.Store(true)
	w.r.conns.connected.Add(1)
	w.book.connected(time.Since(start).Nanoseconds())
	w.book.presenceChanged(u.idx, true, start.UnixNano())
	return true
}

// subscribe subscribes mc to the user's inbox and watched presence.
func (u *wlUser) subscribe(mc mqtt.Client) error {
	filters := map[string]byte{fmt.Sprintf(u.w.r.cfg.Topic, u.id): 1}
	for _, c := range u.watch {
		filters["presence/"+u.w.users[c].id] = 0
	}
	tok := mc.SubscribeMultiple(filters, nil)
	if !tok.WaitTimeout(u.w.r.cfg.ConnectTimeout) {
		return fmt.Errorf("subscribe %s: no SUBACK within %s", u.id, u.w.r.cfg.ConnectTimeout)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("subscribe %s: %w", u.id, err)
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok {
		for f, code := range st.Result() {
			if code >= 0x80 {
				return fmt.Errorf("subscribe %s to %s: refused", u.id, f)
			}
		}
	}
	return nil
}

// disconnect ends the user's session, leaving it on the broker.
func (u *wlUser) disconnect() {
	if !u.online.Swap(false) {
		return
	}
	u.w.book.presenceChanged(u.idx, false, time.Now().UnixNano())
	u.mc.Disconnect(50)
	u.w.r.conns.connected.Add(-1)
	u.w.book.disconnected()
}

// newClient builds the paho client of one session: a persistent session
// under the user's ID, so that what arrives while it is away waits.
func (u *wlUser) newClient() (mqtt.Client, error) {
	w := u.w
	tok, err := u.tokenFor()
	if err != nil {
		return nil, err
	}
	o := w.r.v3Options(u.id, u.idx)
	o.SetUsername(u.id).
		SetPassword(tok).
		SetDefaultPublishHandler(u.onMessage).
		SetOnConnectHandler(func(mc mqtt.Client) {
			// A reconnection within a session subscribes again; the
			// first connection's subscription is made by connect.
			if u.online.Load() {
				if err := u.subscribe(mc); err != nil {
					w.r.errs.add(err)
				}
			}
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			w.r.conns.lost.Add(1)
			w.r.conns.noteLoss(fmt.Errorf("%s: %w", u.id, err))
		})
	return mqtt.NewClient(o), nil
}

// act does one action drawn from the phase's mix.
func (u *wlUser) act(ctx context.Context, p workload.Phase) {
	action := p.Pick(u.rng.Float64())
	if action == workload.Group && len(u.groups) == 0 {
		action = workload.DM
	}
	switch action {
	case workload.DM:
		u.w.book.acted(action, false)
		to := u.contacts[u.rng.IntN(len(u.contacts))]
		u.send(action, fmt.Sprintf(u.w.r.cfg.Topic, u.w.users[to].id), []int{to}, "")
	case workload.Group:
		u.w.book.acted(action, false)
		g := u.w.groups[u.groups[u.rng.IntN(len(u.groups))]]
		to := slices.DeleteFunc(slices.Clone(g.members), func(m int) bool { return m == u.idx })
		u.send(action, "group/"+g.id, to, "")
	case workload.Media:
		u.w.book.acted(action, false)
		to := u.contacts[u.rng.IntN(len(u.contacts))]
		start := time.Now()
		b, err := u.w.call(ctx, u, http.MethodPost, "/v1/media", "image/jpeg", u.w.media)
		var up struct{ ID string }
		if err == nil {
			err = json.Unmarshal(b, &up)
		}
		if ctx.Err() != nil {
			// The run ended during the upload: not a failure.
			return
		}
		if err != nil || up.ID == "" {
			u.w.book.failed(action)
			u.w.r.errs.add(fmt.Errorf("upload by %s: %w (answer %q)", u.id, err, b))
			return
		}
		u.w.book.uploaded(time.Since(start).Nanoseconds())
		u.send(action, fmt.Sprintf(u.w.r.cfg.Topic, u.w.users[to].id), []int{to}, up.ID)
	case workload.Read:
		u.read()
	case workload.Typing:
		u.w.book.acted(action, false)
		to := u.contacts[u.rng.IntN(len(u.contacts))]
		u.w.book.typingSent(u.idx, to, u.w.users[to].online.Load(), time.Now().UnixNano())
		// QoS 0: the token completes once the packet is written.
		tok := u.mc.Publish("typing/"+u.w.users[to].id, 0, false, []byte(`{}`))
		if tok.WaitTimeout(u.w.r.cfg.ConnectTimeout) && tok.Error() != nil {
			u.w.r.errs.add(fmt.Errorf("typing from %s: %w", u.id, tok.Error()))
		}
	}
}

// send publishes one message and waits for its PUBACK: a person sends
// one message after another, and the order of a pair's messages is
// then the order the broker must keep.
func (u *wlUser) send(action, topic string, to []int, media string) {
	u.n++
	id := u.w.book.msgID(u.n)
	var b bytes.Buffer
	fmt.Fprintf(&b, `{"id":%q,"text":%q`, id, u.w.text)
	if media != "" {
		fmt.Fprintf(&b, `,"media":%q`, media)
	}
	b.WriteByte('}')
	online := make([]bool, len(to))
	for i, t := range to {
		online[i] = u.w.users[t].online.Load()
	}
	now := time.Now()
	u.w.book.sending(action, u.idx, u.n, to, online, now.UnixNano())
	tok := u.mc.Publish(topic, 1, false, b.Bytes())
	if !tok.WaitTimeout(u.w.r.cfg.ConnectTimeout) {
		u.w.book.sendFailed(u.idx, u.n)
		u.w.r.errs.add(fmt.Errorf("publish %s to %s: no PUBACK within %s", id, topic, u.w.r.cfg.ConnectTimeout))
		return
	}
	if err := tok.Error(); err != nil {
		u.w.book.sendFailed(u.idx, u.n)
		u.w.r.errs.add(fmt.Errorf("publish %s to %s: %w", id, topic, err))
		return
	}
	u.w.book.acked(u.idx, u.n, time.Now().UnixNano())
}

// read marks read the messages of one sender with unread messages,
// drawn at random, with a read receipt to that sender.
func (u *wlUser) read() {
	u.mu.Lock()
	senders := slices.Sorted(func(yield func(int) bool) {
		for s := range u.unread {
			if !yield(s) {
				return
			}
		}
	})
	if len(senders) == 0 {
		u.mu.Unlock()
		u.w.book.acted(workload.Read, true)
		return
	}
	sender := senders[u.rng.IntN(len(senders))]
	ids := u.unread[sender]
	delete(u.unread, sender)
	u.mu.Unlock()
	u.w.book.acted(workload.Read, false)
	body, err := json.Marshal(map[string]any{"status": "read", "ids": ids})
	if err != nil {
		u.w.r.errs.add(fmt.Errorf("read receipt: %w", err))
		return
	}
	u.w.book.readSending(u.idx, sender, ids, u.w.users[sender].online.Load(), time.Now().UnixNano())
	tok := u.mc.Publish("receipt/"+u.w.users[sender].id, 1, false, body)
	if !tok.WaitTimeout(u.w.r.cfg.ConnectTimeout) {
		err = fmt.Errorf("no PUBACK within %s", u.w.r.cfg.ConnectTimeout)
	} else {
		err = tok.Error()
	}
	u.w.book.readAcked(u.idx, sender, ids, err == nil, time.Now().UnixNano())
	if err != nil {
		u.w.r.errs.add(fmt.Errorf("read receipt from %s to %s: %w", u.id, u.w.users[sender].id, err))
	}
}

// onMessage handles what the broker delivers: the inbox's envelopes and
// the watched users' presence.
func (u *wlUser) onMessage(_ mqtt.Client, m mqtt.Message) {
	now := time.Now().UnixNano()
	b := u.w.book
	if user, ok := strings.CutPrefix(m.Topic(), "presence/"); ok {
		var p struct{ Online bool }
		if m.Retained() || json.Unmarshal(m.Payload(), &p) != nil {
			return
		}
		b.presenceSeen(user, p.Online, now)
		return
	}
	var env struct {
		Kind, From, Status, By, Code, Ref string
		IDs                               []string
		Msg                               struct{ ID string }
	}
	if err := json.Unmarshal(m.Payload(), &env); err != nil {
		b.mu.Lock()
		b.counts.Malformed++
		b.mu.Unlock()
		return
	}
	switch env.Kind {
	case "msg":
		if b.delivered(u.idx, env.From, env.Msg.ID, now) {
			if from, ok := b.index[env.From]; ok {
				u.mu.Lock()
				u.unread[from] = append(u.unread[from], env.Msg.ID)
				u.mu.Unlock()
			}
		}
	case "receipt":
		if env.Status == "read" {
			b.readArrived(u.idx, env.By, env.IDs, now)
		}
		b.mu.Lock()
		b.counts.Receipts++
		b.mu.Unlock()
	case "typing":
		b.typingArrived(u.idx, env.From, now)
	case "error":
		if env.Ref != "" {
			b.refused(u.idx, env.Ref, env.Code)
		} else {
			b.errorEvent(env.Code)
		}
	default:
		b.mu.Lock()
		b.counts.Other++
		b.mu.Unlock()
	}
}
