package hooks

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Users is what the hooks keep per connected user: how many connections
// it has and its publish budgets, shared by all its devices. A user with
// no connection has no entry, so memory follows the connected users.
type Users struct {
	// MaxConnections caps one user's connections.
	MaxConnections int
	// PublishRate is each user's publishes per second.
	PublishRate float64
	// PublishBytesRate is each user's published bytes per second.
	PublishBytesRate int

	mu sync.Mutex
	m  map[string]*userState
}

// userState is one connected user's count and token buckets.
type userState struct {
	conns int
	msgs  *rate.Limiter
	bytes *rate.Limiter
}

// Connections returns how many connections user has.
func (u *Users) Connections(user string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if st, ok := u.m[user]; ok {
		return st.conns
	}
	return 0
}

// join counts a new connection of user and returns its shared state.
func (u *Users) join(user string) *userState {
	u.mu.Lock()
	defer u.mu.Unlock()
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
		u.m[user] = st
	}
	st.conns++
	return st
}

// leave counts a closed connection of user.
func (u *Users) leave(user string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if st, ok := u.m[user]; ok {
		st.conns--
		if st.conns <= 0 {
			delete(u.m, user)
		}
	}
}

// allow spends one publish of n bytes from the user's budgets.
func (st *userState) allow(n int) bool { return st.allowN(1, n) }

// allowN spends msgs publishes of n bytes in all from the user's budgets.
func (st *userState) allowN(msgs, n int) bool {
	now := time.Now()
	return st.msgs.AllowN(now, msgs) && st.bytes.AllowN(now, n)
}
