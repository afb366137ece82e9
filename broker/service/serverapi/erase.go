package serverapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/bans"
	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/broker/service/httpjson"
	"github.com/chatd/chatd/broker/service/media"
)

// Media is what erase and export do with a user's uploads (media.Store).
type Media interface {
	// Owned lists the uploads of owner.
	Owned(ctx context.Context, owner string) ([]media.Info, error)
	// Delete removes an upload.
	Delete(ctx context.Context, id string) error
}

// ErasedAnswer is the answer of DELETE /v1/server/users/{user}.
type ErasedAnswer struct {
	// User is the erased user.
	User string `json:"user"`
	// Devices are the devices forgotten, by client ID.
	Devices []string `json:"devices"`
	// GroupsLeft are the groups the user was taken out of.
	GroupsLeft []string `json:"groups_left"`
	// GroupsDeleted are the groups it alone administered, deleted.
	GroupsDeleted []string `json:"groups_deleted"`
	// MediaDeleted counts the uploads deleted.
	MediaDeleted int `json:"media_deleted"`
}

// Export is the answer of GET /v1/server/users/{user}/export: what the
// server stores about a user.
type Export struct {
	// User is the user exported.
	User string `json:"user"`
	// Exported is when, in Unix milliseconds.
	Exported int64 `json:"exported"`
	UserPresence
	// Devices are the user's devices.
	Devices []deviceapi.Device `json:"devices"`
	// Groups are the user's groups and its role in each.
	Groups []GroupRole `json:"groups"`
	// Media are the user's uploads.
	Media []media.Info `json:"media"`
	// Ban is the ban on the user, if one holds.
	Ban *bans.Ban `json:"ban"`
	// Queue is what waits in the user's queue, oldest first; it is
	// written after the rest, page by page, not held whole in memory
	// (always, even empty: omitempty leaves it out of the rest).
	Queue []Queued `json:"queue,omitempty"`
}

// GroupRole is a user's membership of one group.
type GroupRole struct {
	// ID is the group's ID.
	ID string `json:"id"`
	// Admin reports whether the user administers it.
	Admin bool `json:"admin"`
	// Creator reports whether the user made it.
	Creator bool `json:"creator"`
}

// Queued is one message in a user's queue.
type Queued struct {
	// Seq is its position in the queue.
	Seq uint64 `json:"seq"`
	// Envelope is what the user's devices receive.
	Envelope json.RawMessage `json:"envelope"`
}

// exportPage is how many queued messages one read of an export fetches.
const exportPage = 500

// mediaTimeout bounds the media calls of one erase or export.
const mediaTimeout = time.Minute

func (h *Handler) registerErase(mux *http.ServeMux) {
	mux.HandleFunc("DELETE /v1/server/users/{user}", h.erase)
	mux.HandleFunc("GET /v1/server/users/{user}/export", h.export)
}

// pathUser returns the {user} of r, or answers 400.
func pathUser(w http.ResponseWriter, r *http.Request) (string, bool) {
	user := r.PathValue("user")
	if !topic.ValidUser(user) {
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("%q is not a user ID", user))
		return "", false
	}
	return user, true
}

// erase forgets a user: its presence, connections, devices, queue and
// dedup keys, group memberships (and the groups it alone administers)
// and uploads. Every step is idempotent, so a call that failed half way
// is completed by the next.
func (h *Handler) erase(w http.ResponseWriter, r *http.Request) {
	k, ok := h.auth(w, r, apikeys.ScopeErase)
	if !ok {
		return
	}
	user, ok := pathUser(w, r)
	if !ok {
		return
	}
	// Presence first: the connections this ends go offline without
	// storing a last-seen time again.
	if err := h.Presence.Erase(user); err != nil {
		h.internal(w, "erase presence", err)
		return
	}
	h.Conns.Erased(user)
	ans := ErasedAnswer{User: user, Devices: []string{}, GroupsLeft: []string{}, GroupsDeleted: []string{}}
	names, err := h.Queues.Erase(user)
	for _, d := range names {
		// Ends its connection, and drops it from the peers' memory.
		h.Conns.Removed(user, d)
		ans.Devices = append(ans.Devices, topic.ClientID(user, d))
	}
	if err != nil {
		h.internal(w, "erase queue", err)
		return
	}
	left, deleted, err := h.Groups.Erase(user)
	ans.GroupsLeft, ans.GroupsDeleted = append(ans.GroupsLeft, left...), append(ans.GroupsDeleted, deleted...)
	if err != nil {
		h.internal(w, "erase groups", err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), mediaTimeout)
	defer cancel()
	uploads, err := h.Media.Owned(ctx, user)
	if err != nil {
		h.internal(w, "erase media", err)
		return
	}
	for _, u := range uploads {
		if err := h.Media.Delete(ctx, u.ID); err != nil && !errors.Is(err, media.ErrNotFound) {
			h.internal(w, "erase media", err)
			return
		}
		ans.MediaDeleted++
	}
	h.Log.Info("user erased", "user", user, "key", k.Name, "devices", len(ans.Devices),
		"groups_left", len(ans.GroupsLeft), "groups_deleted", len(ans.GroupsDeleted), "media", ans.MediaDeleted)
	httpjson.Write(w, http.StatusOK, ans)
}

// export answers what the server stores about a user.
func (h *Handler) export(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeErase); !ok {
		return
	}
	user, ok := pathUser(w, r)
	if !ok {
		return
	}
	ex := Export{User: user, Exported: h.Now().UnixMilli(), Groups: []GroupRole{}}
	var err error
	if ex.UserPresence, err = h.userPresence(user); err != nil {
		h.internal(w, "export presence", err)
		return
	}
	if ex.Devices, err = h.devices(user); err != nil {
		h.internal(w, "export devices", err)
		return
	}
	gids, err := h.Groups.MemberOf(user)
	if err != nil {
		h.internal(w, "export groups", err)
		return
	}
	for _, gid := range gids {
		g, err := h.Groups.Get(gid)
		if errors.Is(err, groups.ErrUnknown) {
			continue // deleted meanwhile
		}
		if err != nil {
			h.internal(w, "export groups", err)
			return
		}
		ex.Groups = append(ex.Groups, GroupRole{ID: gid, Admin: g.IsAdmin(user), Creator: g.Creator == user})
	}
	ctx, cancel := context.WithTimeout(r.Context(), mediaTimeout)
	defer cancel()
	if ex.Media, err = h.Media.Owned(ctx, user); err != nil {
		h.internal(w, "export media", err)
		return
	}
	if b, ok := h.Bans.Banned(user); ok {
		ex.Ban = &b
	}
	// The first page is read before anything is written, so that a
	// store that fails at once gets a 500.
	msgs, err := h.Queues.Read(user, 0, exportPage)
	if err != nil {
		h.internal(w, "export queue", err)
		return
	}
	head, err := json.Marshal(ex)
	if err != nil {
		h.internal(w, "export", err)
		return
	}
	// ex.Queue is nil, so left out: the object is reopened for it.
	head = append(head[:len(head)-1], `,"queue":`...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", "chatd-export-"+user+".json"))
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriter(w)
	bw.Write(head)
	bw.WriteByte('[')
	first := true
	for {
		for _, m := range msgs {
			if !first {
				bw.WriteByte(',')
			}
			first = false
			item, err := json.Marshal(Queued{Seq: m.Seq, Envelope: json.RawMessage(m.Data)})
			if err != nil {
				h.Log.Error("server API: export queue", "user", user, "error", err)
				return
			}
			bw.Write(item)
		}
		if len(msgs) < exportPage {
			break
		}
		if msgs, err = h.Queues.Read(user, msgs[len(msgs)-1].Seq, exportPage); err != nil {
			// The answer is under way: cut short, it is not valid JSON,
			// which the caller sees.
			h.Log.Error("server API: export queue", "user", user, "error", err)
			return
		}
	}
	bw.WriteString("]}\n")
	if err := bw.Flush(); err != nil {
		h.Log.Debug("server API: export not read", "user", user, "error", err)
	}
}
