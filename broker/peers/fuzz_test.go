package peers

import (
	"io"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go"
)

// FuzzNotices feeds arbitrary bytes to every notice handler: a peer's
// notice, or anything else on those subjects, must never panic a node.
func FuzzNotices(f *testing.F) {
	f.Add([]byte{0, 1, 'a', 0, 3, 'b', 'o', 'b', 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, '{', '}'})
	f.Add(append(frame(frame(nil, "a"), "bob/phone"), 1))
	f.Add([]byte{0, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := newRecorder()
		r.signal = make(chan struct{}, 1<<20)
		b := &Bus{opts: Options{Node: "self", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, h: r.handlers(), peers: map[string]peer{}}
		for _, h := range []nats.MsgHandler{b.onStored, b.onTyping, b.onPresence, b.onSession, b.onHeartbeat} {
			h(&nats.Msg{Subject: "test", Data: data})
		}
	})
}
