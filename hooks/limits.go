package hooks

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// sweepEvery is how many departures pass between sweeps of the budgets of
// users who left: often enough to bound them, rarely enough to cost nothing.
const sweepEvery = 1024

// Users is what the hooks keep per user: how many connections it has and
// its publish budgets, shared by all its devices. A user who leaves with
// budgets still spent keeps them until they refill, so that reconnecting
// does not buy a fresh burst; otherwise memory follows the connected users.
type Users struct {
	// MaxConnections caps one user's connections.
	MaxConnections int
	// PublishRate is each user's publishes per second.
	PublishRate float64
	// PublishBytesRate is each user's published bytes per second.
	PublishBytesRate int
	// MaxDelay is how long a publish over budget may wait for it before it is refused.
	MaxDelay time.Duration

	mu     sync.Mutex
	m      map[string]*userState
	leaves int
}

// userState is one user's connection counts and token buckets.
type userState struct {
	// seats counts the connections Auth admitted and has not seen end:
	// what the cap on connections is checked against.
	seats int
	// conns counts the sessions sharing the budgets (join to leave).
	conns int
	msgs  *rate.Limiter
	bytes *rate.Limiter
	// maxDelay is Users.MaxDelay, in nanoseconds: SetLimits changes it
	// while publishes read it.
	maxDelay atomic.Int64
}

// SetLimits changes the caps and rates, for the users connected now as
// for those to come (a configuration reload): a lower cap on connections
// ends none, it refuses the next; budgets keep what they hold, up to
// their new burst.
func (u *Users) SetLimits(maxConnections int, publishRate float64, publishBytesRate int, maxDelay time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.MaxConnections, u.PublishRate, u.PublishBytesRate, u.MaxDelay = maxConnections, publishRate, publishBytesRate, maxDelay
	for _, st := range u.m {
		st.msgs.SetLimit(rate.Limit(publishRate))
		st.msgs.SetBurst(max(1, int(2*publishRate)))
		st.bytes.SetLimit(rate.Limit(publishBytesRate))
		st.bytes.SetBurst(max(1, 2*publishBytesRate))
		st.maxDelay.Store(int64(maxDelay))
	}
}

// Connections returns how many connections of user were admitted and have
// not ended yet.
func (u *Users) Connections(user string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if st, ok := u.m[user]; ok {
		return st.seats
	}
	return 0
}

// reserve takes a connection seat for user and returns how many it had
// before. Checking the cap and counting the new connection in one step
// keeps parallel CONNECTs from all passing a check none of them is counted
// in yet. Past the cap it takes nothing and reports false, unless takeover
// is set: a device replacing its own connection, whose seat is about to be
// given back, is not refused, though it holds a seat of its own until then.
// Every seat taken must be given back with release.
func (u *Users) reserve(user string, takeover bool) (n int, ok bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	st := u.state(user)
	n = st.seats
	if n >= u.MaxConnections && !takeover {
		u.drop(user, st, time.Now())
		return n, false
	}
	st.seats++
	return n, true
}

// release gives back a seat taken by reserve.
func (u *Users) release(user string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	st, ok := u.m[user]
	if !ok {
		return
	}
	st.seats--
	u.drop(user, st, time.Now())
}

// join counts a new session of user and returns its shared state.
func (u *Users) join(user string) *userState {
	u.mu.Lock()
	defer u.mu.Unlock()
	st := u.state(user)
	st.conns++
	return st
}

// leave counts a closed session of user.
func (u *Users) leave(user string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	st, ok := u.m[user]
	if !ok {
		return
	}
	st.conns--
	now := time.Now()
	u.drop(user, st, now)
	if u.leaves++; u.leaves%sweepEvery == 0 {
		for name, st := range u.m {
			u.drop(name, st, now)
		}
	}
}

// state returns user's state, created with full budgets if it has none.
// u.mu must be held.
func (u *Users) state(user string) *userState {
	if u.m == nil {
		u.m = make(map[string]*userState)
	}
	st, ok := u.m[user]
	if !ok {
		// Bursts of twice the rate let a phone send what it queued offline.
		st = &userState{
			msgs:  rate.NewLimiter(rate.Limit(u.PublishRate), max(1, int(2*u.PublishRate))),
			bytes: rate.NewLimiter(rate.Limit(u.PublishBytesRate), max(1, 2*u.PublishBytesRate)),
		}
		st.maxDelay.Store(int64(u.MaxDelay))
		u.m[user] = st
	}
	return st
}

// drop forgets user's state once nothing holds it: no seat, no session,
// and budgets full again at now, since a spent budget must outlive a
// reconnect. u.mu must be held.
func (u *Users) drop(user string, st *userState, now time.Time) {
	if st.seats <= 0 && st.conns <= 0 && st.refilled(now) {
		delete(u.m, user)
	}
}

// size returns how many users have state.
func (u *Users) size() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.m)
}

// refilled reports whether both buckets are full again at now.
func (st *userState) refilled(now time.Time) bool {
	return st.msgs.TokensAt(now) >= float64(st.msgs.Burst()) && st.bytes.TokensAt(now) >= float64(st.bytes.Burst())
}

// Spend takes msgs publishes of n bytes in all from the user's budgets.
// Over budget, it waits up to maxDelay for them to refill: the caller is
// the client's reader, so a client sending too fast is read no faster than
// its rate and its TCP window closes, which slows that client alone
// instead of answering each excess publish. False means the wait would be
// longer (or the request is larger than a whole burst): the publish is
// refused. waited reports a publish that had to wait.
func (st *userState) Spend(msgs, n int) (ok, waited bool) {
	now := time.Now()
	rm := st.msgs.ReserveN(now, msgs)
	rb := st.bytes.ReserveN(now, n)
	if !rm.OK() || !rb.OK() {
		rm.CancelAt(now)
		rb.CancelAt(now)
		return false, false
	}
	d := max(rm.DelayFrom(now), rb.DelayFrom(now))
	if d > time.Duration(st.maxDelay.Load()) {
		rm.CancelAt(now)
		rb.CancelAt(now)
		return false, false
	}
	if d <= 0 {
		return true, false
	}
	time.Sleep(d)
	return true, true
}
