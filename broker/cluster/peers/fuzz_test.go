package peers

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// FuzzNotices feeds arbitrary bytes and header values to every notice
// handler: a peer's notice, or anything else on those subjects, must never
// panic a node. The bus is fed twice, so that numbers meet a tally.
func FuzzNotices(f *testing.F) {
	f.Add([]byte{0, 1, 'a', 0, 3, 'b', 'o', 'b', 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, '{', '}'}, "", "", false)
	f.Add([]byte{0, 1, 'a', 0, 3, 'b', 'o', 'b', 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, '{', '}'}, "12.3", "", false)
	f.Add(append(frame(frame(nil, "a"), "bob/phone"), 1), "", "", false)
	f.Add([]byte{0, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 0, 1}, "", "5", true)
	f.Add([]byte{0, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 0, 1}, "1.18446744073709551615", "18446744073709551615", false)
	f.Fuzz(func(t *testing.T, data []byte, notice, sent string, final bool) {
		r := newRecorder()
		r.signal = make(chan struct{}, 1<<20)
		b := &Bus{opts: Options{Node: "self", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, h: r.handlers(),
			peers: map[string]peer{}, tallies: map[string]*tally{}}
		h := nats.Header{}
		if notice != "" {
			h.Set(hdrNotice, notice)
		}
		if sent != "" {
			h.Set(hdrSent, sent)
		}
		if final {
			h.Set(hdrFinal, "1")
		}
		for range 2 {
			for _, fn := range []nats.MsgHandler{b.onStored, b.onTyping, b.onPresence, b.onSession, b.onHeartbeat} {
				fn(&nats.Msg{Subject: "test", Data: data, Header: h})
			}
		}
		b.reap(time.Now().Add(time.Hour))
	})
}
