package envelope

import (
	"errors"
	"strings"
	"testing"
)

// benchPayloads are message objects of the shapes the publish path sees:
// a short chat message, one whose id follows a long text, one with nested
// app data before the id, and a 4 KiB one padded with escapes.
var benchPayloads = []struct {
	name    string
	payload []byte
}{
	{"short", []byte(`{"id":"m-1764145476123-42","text":"see you at eight?"}`)},
	{"id last", []byte(`{"text":"` + strings.Repeat("lorem ipsum dolor sit amet ", 20) + `","id":"m-1764145476123-42"}`)},
	{"nested", []byte(`{"reply_to":{"id":"m-1","from":"bob"},"attachments":[{"url":"https://x.example/a.jpg","w":640,"h":480},{"url":"https://x.example/b.jpg","w":640,"h":480}],"text":"look","id":"m-2"}`)},
	{"4KiB escaped", []byte(`{"id":"m-3","text":"` + strings.Repeat(`say \"hi\" \u00e9 `, 256) + `"}`)},
}

func BenchmarkValidate(b *testing.B) {
	benchEach(b, func(p []byte) error {
		_, err := Validate(p, 64<<10)
		return err
	})
}

func BenchmarkRefOf(b *testing.B) {
	benchEach(b, func(p []byte) error {
		if RefOf(p) == "" {
			return errors.New("no ref")
		}
		return nil
	})
}

// BenchmarkTopLevelID measures the walk over the object alone, which
// json.Valid's cost hides in the benchmarks above.
func BenchmarkTopLevelID(b *testing.B) {
	benchEach(b, func(p []byte) error {
		_, found, err := topLevelID(p)
		if err == nil && !found {
			return errors.New("no id")
		}
		return err
	})
}

// benchEach runs fn on every benchPayload, failing on its error.
func benchEach(b *testing.B, fn func([]byte) error) {
	for _, bp := range benchPayloads {
		b.Run(bp.name, func(b *testing.B) {
			b.SetBytes(int64(len(bp.payload)))
			b.ReportAllocs()
			for b.Loop() {
				if err := fn(bp.payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
