package groups

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/chatd/chatd/broker/service/httpjson"
)

// maxRequestBytes bounds a group API request body.
const maxRequestBytes = 256 << 10

// Handler serves the group API.
type Handler struct {
	// Store holds the groups.
	Store *Store
	// Authenticate returns the user a request is made by.
	Authenticate func(r *http.Request) (string, error)
	// Log receives internal errors.
	Log *slog.Logger
}

// Register adds the group routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/groups", h.create)
	mux.HandleFunc("GET /v1/groups/{gid}", h.get)
	mux.HandleFunc("DELETE /v1/groups/{gid}", h.delete)
	mux.HandleFunc("PUT /v1/groups/{gid}/members/{user}", h.addMember)
	mux.HandleFunc("DELETE /v1/groups/{gid}/members/{user}", h.removeMember)
}

func (h *Handler) create(w http.ResponseWriter, r *http.Request) {
	user, ok := h.auth(w, r)
	if !ok {
		return
	}
	var req struct {
		ID      string   `json:"id"`
		Members []string `json:"members"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		h.fail(w, fmt.Errorf("%w: body: %w", ErrInvalid, err))
		return
	}
	g, err := h.Store.Create(user, req.ID, req.Members)
	if err != nil {
		h.fail(w, err)
		return
	}
	httpjson.Write(w, http.StatusCreated, g)
}

func (h *Handler) get(w http.ResponseWriter, r *http.Request) {
	user, ok := h.auth(w, r)
	if !ok {
		return
	}
	g, err := h.Store.Get(r.PathValue("gid"))
	if err != nil {
		h.fail(w, err)
		return
	}
	if !g.IsMember(user) {
		// Answered as a missing group, so that non-members cannot tell
		// which groups exist.
		h.fail(w, unknown(g.ID))
		return
	}
	httpjson.Write(w, http.StatusOK, g)
}

// delete answers 204 with no body once the group is gone.
func (h *Handler) delete(w http.ResponseWriter, r *http.Request) {
	user, ok := h.auth(w, r)
	if !ok {
		return
	}
	if err := h.Store.Delete(user, r.PathValue("gid")); err != nil {
		h.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *Handler) addMember(w http.ResponseWriter, r *http.Request) {
	h.edit(w, r, h.Store.AddMember)
}

func (h *Handler) removeMember(w http.ResponseWriter, r *http.Request) {
	h.edit(w, r, h.Store.RemoveMember)
}

func (h *Handler) edit(w http.ResponseWriter, r *http.Request, op func(by, gid, user string) (*Group, error)) {
	by, ok := h.auth(w, r)
	if !ok {
		return
	}
	g, err := op(by, r.PathValue("gid"), r.PathValue("user"))
	if err != nil {
		h.fail(w, err)
		return
	}
	httpjson.Write(w, http.StatusOK, g)
}

func (h *Handler) auth(w http.ResponseWriter, r *http.Request) (string, bool) {
	return httpjson.Authenticated(w, r, h.Authenticate)
}

// fail answers err, logging it when it is the server's own fault.
func (h *Handler) fail(w http.ResponseWriter, err error) {
	if writeError(w, err) == http.StatusInternalServerError {
		h.Log.Error("group API", "error", err)
	}
}

// writeError answers with the protocol error code and HTTP status of err
// and returns the status.
func writeError(w http.ResponseWriter, err error) int {
	status, code := http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, ErrUnknown):
		status, code = http.StatusNotFound, "unknown_group"
	case errors.Is(err, ErrExists):
		status, code = http.StatusConflict, "group_exists"
	case errors.Is(err, ErrNotAuthorized):
		status, code = http.StatusForbidden, "not_authorized"
	case errors.Is(err, ErrTooMany):
		status, code = http.StatusUnprocessableEntity, "too_many_members"
	case errors.Is(err, ErrTooManyGroups):
		status, code = http.StatusUnprocessableEntity, "too_many_groups"
	case errors.Is(err, ErrInvalid):
		status, code = http.StatusBadRequest, "bad_request"
	}
	reason := err.Error()
	if status == http.StatusInternalServerError {
		reason = "internal error"
	}
	httpjson.Fail(w, status, code, reason)
	return status
}
