package serverapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/bans"
	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/broker/service/httpjson"
)

// Connections are the devices' connections on every node.
type Connections interface {
	deviceapi.Connections
	// Moderated ends the connection of device of user, or of every
	// device of user when all is set.
	Moderated(user, device string, all bool)
	// Erased ends every connection of user, and has the other nodes
	// forget its last-seen time.
	Erased(user string)
}

// maxModerationBody bounds the body of a moderation call.
const maxModerationBody = 4096

// maxBanReason bounds a ban's reason.
const maxBanReason = 256

// DisconnectRequest is the body of POST /v1/server/disconnect: a user
// (every device) or one device's client ID.
type DisconnectRequest struct {
	// User ends every connection of the user.
	User string `json:"user"`
	// ClientID ends one device's connection.
	ClientID string `json:"client_id"`
}

// BanRequest is the body of PUT /v1/server/bans/{user}.
type BanRequest struct {
	// Reason is kept with the ban and logged at refused connects.
	Reason string `json:"reason"`
	// DurationS is how long the ban holds, in seconds; 0 means until lifted.
	DurationS int64 `json:"duration_s"`
}

// BanList is the body of GET /v1/server/bans.
type BanList struct {
	// Bans are the bans that hold now, by user.
	Bans []bans.Ban `json:"bans"`
}

func (h *Handler) registerModeration(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/server/disconnect", h.disconnect)
	mux.HandleFunc("PUT /v1/server/bans/{user}", h.ban)
	mux.HandleFunc("DELETE /v1/server/bans/{user}", h.unban)
	mux.HandleFunc("GET /v1/server/bans", h.listBans)
}

func (h *Handler) disconnect(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeModerate); !ok {
		return
	}
	var req DisconnectRequest
	if !decodeBody(w, r, &req, maxModerationBody) {
		return
	}
	switch {
	case req.User != "" && req.ClientID != "":
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, "give user or client_id, not both")
	case req.User != "":
		if !topic.ValidUser(req.User) {
			httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("user %q is not a user ID", req.User))
			return
		}
		h.Conns.Moderated(req.User, "", true)
		w.WriteHeader(http.StatusNoContent)
	case req.ClientID != "":
		user, _, _ := strings.Cut(req.ClientID, "/")
		device, err := topic.ParseClientID(req.ClientID, user)
		if err != nil || !topic.ValidUser(user) {
			httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("client_id %q is not {user} or {user}/{device}", req.ClientID))
			return
		}
		h.Conns.Moderated(user, device, false)
		w.WriteHeader(http.StatusNoContent)
	default:
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, "give user or client_id")
	}
}

func (h *Handler) ban(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeModerate); !ok {
		return
	}
	user := r.PathValue("user")
	if !topic.ValidUser(user) {
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("user %q is not a user ID", user))
		return
	}
	var req BanRequest
	if !decodeBody(w, r, &req, maxModerationBody) {
		return
	}
	if req.DurationS < 0 || len(req.Reason) > maxBanReason {
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, fmt.Sprintf("duration_s must be 0 (until lifted) or more, reason at most %d bytes", maxBanReason))
		return
	}
	now := h.Now()
	b := bans.Ban{User: user, Reason: req.Reason, Created: now.Unix()}
	if req.DurationS > 0 {
		b.Until = now.Add(time.Duration(req.DurationS) * time.Second).Unix()
	}
	if err := h.Bans.Ban(b); err != nil {
		h.Log.Error("server API ban", "user", user, "error", err)
		httpjson.Fail(w, http.StatusServiceUnavailable, "not_stored", "ban not stored; try again")
		return
	}
	// The store ended the user's connections, here and on every node
	// its ban reaches: stored first, so a device reconnecting is refused.
	h.Log.Info("user banned", "user", user, "reason", req.Reason, "until", b.Until)
	httpjson.Write(w, http.StatusOK, b)
}

func (h *Handler) unban(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeModerate); !ok {
		return
	}
	user := r.PathValue("user")
	err := h.Bans.Unban(user)
	switch {
	case errors.Is(err, bans.ErrUnknown):
		httpjson.Fail(w, http.StatusNotFound, "unknown_ban", fmt.Sprintf("user %q is not banned", user))
	case err != nil:
		h.Log.Error("server API unban", "user", user, "error", err)
		httpjson.Fail(w, http.StatusServiceUnavailable, "not_stored", "unban not stored; try again")
	default:
		h.Log.Info("user unbanned", "user", user)
		w.WriteHeader(http.StatusNoContent)
	}
}

func (h *Handler) listBans(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeModerate); !ok {
		return
	}
	list := h.Bans.List()
	if list == nil {
		list = []bans.Ban{}
	}
	httpjson.Write(w, http.StatusOK, BanList{Bans: list})
}

// decodeBody decodes r's JSON body, of at most max bytes, into v, or
// answers 400 (413 when too large) and returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, v any, max int64) bool {
	r.Body = http.MaxBytesReader(w, r.Body, max)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			httpjson.Fail(w, http.StatusRequestEntityTooLarge, msgpath.CodeTooLarge, "request body too large")
			return false
		}
		httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, "request body: "+err.Error())
		return false
	}
	return true
}
