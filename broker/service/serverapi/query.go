package serverapi

import (
	"fmt"
	"net/http"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/broker/service/httpjson"
)

// Presence tells who is online.
type Presence interface {
	// State returns whether user is online, on any node, and when it was
	// last seen in Unix milliseconds (0: never).
	State(user string) (online bool, lastSeen int64, err error)
	// Erase forgets user's last-seen time on this node.
	Erase(user string) error
}

// Queues is what the query calls read of the queues and devices.
type Queues interface {
	deviceapi.Store
	// Depth returns how many messages wait in user's queue.
	Depth(user string) (uint64, error)
	// Read returns up to max messages of user after a sequence.
	Read(user string, after uint64, max int) ([]queue.Message, error)
	// Erase forgets user's devices, queue and dedup keys, and returns
	// the devices forgotten.
	Erase(user string) ([]string, error)
}

// Groups are the group memberships (groups.Store).
type Groups interface {
	// MemberOf returns the IDs of user's groups, sorted.
	MemberOf(user string) ([]string, error)
	// Get returns a group, or groups.ErrUnknown.
	Get(id string) (*groups.Group, error)
	// Erase takes user out of every group, deleting those it alone
	// administers.
	Erase(user string) (left, deleted []string, err error)
}

// Info describes the node for GET /v1/server/info.
type Info struct {
	// Version is chatd's version.
	Version string `json:"version"`
	// Node is the node's name in its cluster, "" on one node.
	Node string `json:"node"`
	// Cluster reports whether the node runs in cluster mode.
	Cluster bool `json:"cluster"`
	// Started is when the node started, in Unix seconds.
	Started int64 `json:"started"`
	// Connections counts the MQTT connections to this node now.
	Connections int `json:"connections"`
}

// maxPresenceUsers caps the users of one presence query.
const maxPresenceUsers = 1000

// PresenceRequest is the body of POST /v1/server/presence.
type PresenceRequest struct {
	// Users are the users asked about, at most 1,000.
	Users []string `json:"users"`
}

// UserPresence is one user's presence.
type UserPresence struct {
	// User is the user ID.
	User string `json:"user"`
	// Online reports a connection on any node.
	Online bool `json:"online"`
	// LastSeen is in Unix milliseconds: now when online, 0 when never seen.
	LastSeen int64 `json:"last_seen"`
}

// PresenceAnswer is the answer of POST /v1/server/presence.
type PresenceAnswer struct {
	// Users are in request order.
	Users []UserPresence `json:"users"`
}

// UserInfo is the answer of GET /v1/server/users/{user}.
type UserInfo struct {
	UserPresence
	// Queued counts the messages in the user's queue.
	Queued uint64 `json:"queued"`
	// Devices are the user's devices, as GET /v1/devices lists them.
	Devices []deviceapi.Device `json:"devices"`
	// Groups are the IDs of the groups the user belongs to, sorted.
	Groups []string `json:"groups"`
}

func (h *Handler) registerQuery(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/server/presence", h.presence)
	mux.HandleFunc("GET /v1/server/users/{user}", h.user)
	mux.HandleFunc("GET /v1/server/info", h.info)
}

func (h *Handler) presence(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeRead); !ok {
		return
	}
	var req PresenceRequest
	if !decodeBody(w, r, &req, maxPresenceUsers*maxRecipientBytes+1024) {
		return
	}
	if len(req.Users) == 0 || len(req.Users) > maxPresenceUsers {
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("users: 1 to %d user IDs", maxPresenceUsers))
		return
	}
	ans := PresenceAnswer{Users: make([]UserPresence, len(req.Users))}
	for i, u := range req.Users {
		if !topic.ValidUser(u) {
			httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("%q is not a user ID", u))
			return
		}
		p, err := h.userPresence(u)
		if err != nil {
			h.internal(w, "presence", err)
			return
		}
		ans.Users[i] = p
	}
	httpjson.Write(w, http.StatusOK, ans)
}

// devices describes user's devices; connections on nodes that did not
// answer are logged and left out.
func (h *Handler) devices(user string) ([]deviceapi.Device, error) {
	devs, partial, err := deviceapi.Describe(h.Queues, h.Conns, h.Now(), user)
	if partial != nil {
		h.Log.Warn("server API: connections not all known", "user", user, "error", partial)
	}
	return devs, err
}

func (h *Handler) userPresence(user string) (UserPresence, error) {
	online, seen, err := h.Presence.State(user)
	return UserPresence{User: user, Online: online, LastSeen: seen}, err
}

func (h *Handler) user(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeRead); !ok {
		return
	}
	user, ok := pathUser(w, r)
	if !ok {
		return
	}
	p, err := h.userPresence(user)
	if err != nil {
		h.internal(w, "user presence", err)
		return
	}
	info := UserInfo{UserPresence: p}
	if info.Queued, err = h.Queues.Depth(user); err != nil {
		h.internal(w, "queue depth", err)
		return
	}
	if info.Devices, err = h.devices(user); err != nil {
		h.internal(w, "devices", err)
		return
	}
	if info.Groups, err = h.Groups.MemberOf(user); err != nil {
		h.internal(w, "groups", err)
		return
	}
	httpjson.Write(w, http.StatusOK, info)
}

func (h *Handler) info(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeRead); !ok {
		return
	}
	httpjson.Write(w, http.StatusOK, h.Info())
}

// internal answers 500 and logs err, the server's own fault.
func (h *Handler) internal(w http.ResponseWriter, what string, err error) {
	httpjson.Internal(w, h.Log, "server API: "+what, err)
}
