// Package deviceapi serves a user's own devices over HTTP: the list of
// them, and the removal of one (a lost phone), with the user's token
// (docs/PROTOCOL.md section 7).
package deviceapi

import (
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/httpjson"
)

// Store is what the API needs of the queue.
type Store interface {
	// Devices lists the devices of user.
	Devices(user string) ([]queue.Device, error)
	// Remove forgets a device of user at once.
	Remove(user, device string) error
	// Waiting counts the messages of user with Seq > after.
	Waiting(user string, after uint64) (uint64, error)
}

// Connections are the devices' live connections, on every node.
type Connections interface {
	// Connected returns which of clientIDs have a connection; it may
	// miss connections on nodes that did not answer, saying so in err.
	Connected(clientIDs []string) (map[string]bool, error)
	// Removed ends the connections of a removed device, on every node.
	Removed(user, device string)
}

// Handler serves the devices API.
type Handler struct {
	// Store holds the devices and their queues.
	Store Store
	// Conns finds and closes the devices' connections.
	Conns Connections
	// Authenticate returns the user a request is made by.
	Authenticate func(r *http.Request) (string, error)
	// Now is the clock of last-seen times of connected devices.
	Now func() time.Time
	// Log receives internal errors.
	Log *slog.Logger
}

// Device is one device as the API lists it.
type Device struct {
	// ClientID is the MQTT client ID the device connects with.
	ClientID string `json:"client_id"`
	// Online reports whether it has a connection now.
	Online bool `json:"online"`
	// LastSeen is when it was last seen, in Unix seconds: now if online.
	LastSeen int64 `json:"last_seen"`
	// Waiting counts the messages queued for it that it has not acknowledged.
	Waiting uint64 `json:"waiting"`
	// Transient marks a clean-session device, forgotten when it leaves.
	Transient bool `json:"transient"`
}

// List is the body of GET /v1/devices.
type List struct {
	Devices []Device `json:"devices"`
}

// Register adds the devices routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/devices", h.list)
	mux.HandleFunc("DELETE /v1/devices/{client_id...}", h.remove)
}

func (h *Handler) list(w http.ResponseWriter, r *http.Request) {
	user, ok := h.auth(w, r)
	if !ok {
		return
	}
	devs, partial, err := Describe(h.Store, h.Conns, h.Now(), user)
	if err != nil {
		h.internal(w, "list devices", err)
		return
	}
	if partial != nil {
		// The list is still right but for who is online on a silent node.
		h.Log.Warn("devices API: connections not all known", "user", user, "error", partial)
	}
	httpjson.Write(w, http.StatusOK, List{Devices: devs})
}

// Describe returns the devices of user as the API lists them, at now.
// partial, when set, names the nodes that did not say which devices are
// connected to them: the list is right but for those.
func Describe(store Store, conns Connections, now time.Time, user string) (devs []Device, partial, err error) {
	ds, err := store.Devices(user)
	if err != nil {
		return nil, nil, err
	}
	ids := make([]string, len(ds))
	for i, d := range ds {
		ids[i] = topic.ClientID(user, d.Name)
	}
	online, partial := conns.Connected(ids)
	devs = make([]Device, len(ds))
	for i, d := range ds {
		dev := Device{
			ClientID:  ids[i],
			Online:    d.Connected || online[ids[i]],
			LastSeen:  d.Seen.Unix(),
			Transient: d.Transient,
		}
		if dev.Online {
			dev.LastSeen = now.Unix()
		}
		if dev.Waiting, err = store.Waiting(user, d.Cursor); err != nil {
			return nil, nil, err
		}
		devs[i] = dev
	}
	return devs, partial, nil
}

// remove forgets the device first and closes its connections after, so
// that a device reconnecting at once is registered anew, starting from
// what arrives then; it answers 204.
func (h *Handler) remove(w http.ResponseWriter, r *http.Request) {
	user, ok := h.auth(w, r)
	if !ok {
		return
	}
	id := r.PathValue("client_id")
	device, err := topic.ParseClientID(id, user)
	if err != nil {
		// Another user's device, or no device at all: the same answer,
		// so that nobody learns of devices that are not theirs.
		unknown(w, id)
		return
	}
	if err := h.Store.Remove(user, device); err != nil {
		if errors.Is(err, queue.ErrUnknownDevice) {
			unknown(w, id)
			return
		}
		h.internal(w, "remove device", err)
		return
	}
	h.Conns.Removed(user, device)
	h.Log.Info("device removed by its user", "user", user, "client_id", id)
	w.WriteHeader(http.StatusNoContent)
}

func (h *Handler) auth(w http.ResponseWriter, r *http.Request) (string, bool) {
	return httpjson.Authenticated(w, r, h.Authenticate)
}

// internal answers 500 and logs err, the server's own fault.
func (h *Handler) internal(w http.ResponseWriter, what string, err error) {
	httpjson.Internal(w, h.Log, "devices API: "+what, err)
}

func unknown(w http.ResponseWriter, id string) {
	httpjson.Fail(w, http.StatusNotFound, "unknown_device", "no device "+id+" of yours")
}
