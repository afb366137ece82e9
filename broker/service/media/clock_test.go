package media

import (
	"net/http"
	"testing"
	"time"
)

// TestNilClockIsWallClock: a Disk and a Handler whose Now is nil go by
// time.Now, so a server that sets no clock stamps and expires uploads by
// the wall clock.
func TestNilClockIsWallClock(t *testing.T) {
	tests := []struct {
		name       string
		age        time.Duration // how long before now the upload is stamped
		wantStatus int
	}{
		{"fresh", 0, http.StatusOK},
		{"within the TTL", 59 * time.Minute, http.StatusOK},
		{"past the TTL", 2 * time.Hour, http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, 1<<20)
			f.h.TTL = time.Hour
			if f.h.Now != nil {
				t.Fatal("the fixture's Handler has a clock")
			}
			if tt.age != 0 {
				f.disk.Now = func() time.Time { return time.Now().Add(-tt.age) }
			}
			before := time.Now()
			ur := f.mustUpload(t, []byte("x"))
			after := time.Now()
			file, info, err := f.disk.Open(t.Context(), ur.ID)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if err := file.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if created := info.Created.Add(tt.age); created.Before(before.Add(-time.Second)) || created.After(after.Add(time.Second)) {
				t.Errorf("created %v, want %v ago, between %v and %v", info.Created, tt.age, before, after)
			}
			resp, _ := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-alice", nil, nil)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("GET: %s, want %d", resp.Status, tt.wantStatus)
			}
		})
	}
}
