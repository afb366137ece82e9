// Package media keeps the files of PROTOCOL.md section 7 (POST /v1/media,
// GET /v1/media/{id}) and deletes them after a TTL.
package media

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// ErrNotFound is returned for an id that is unknown, deleted or malformed.
var ErrNotFound = errors.New("media not found")

// ErrTooLarge is returned by Put when the upload is longer than its limit.
var ErrTooLarge = errors.New("media too large")

// Info describes one stored upload.
type Info struct {
	// ID names the upload: 32 lowercase hex digits, 128 random bits.
	ID string `json:"id"`
	// Size is the length of the file in bytes.
	Size int64 `json:"size"`
	// SHA256 is the lowercase hex SHA-256 of the file.
	SHA256 string `json:"sha256"`
	// ContentType is the media type given at upload, stored verbatim.
	ContentType string `json:"content_type"`
	// Created is when the upload was committed; expiry counts from it.
	Created time.Time `json:"created"`
	// Owner is the user who uploaded the file.
	Owner string `json:"owner"`
}

// Store keeps uploaded files. Implementations are safe for concurrent use.
//
// Guarantees every implementation gives:
//   - Put streams r into storage without holding it whole in memory. When it
//     returns nil the upload is complete and durable (it survives a crash or
//     power loss) and Open finds it by the returned ID. When it returns an
//     error (read error, cancelled ctx, ErrTooLarge, storage failure) no
//     upload exists under any ID and nothing of the partial upload remains.
//     An upload becomes visible atomically: Open never sees a partial file.
//   - Open, Delete: an ID not in the format of Info.ID is rejected with
//     ErrNotFound before any storage access, so a caller may pass untrusted
//     input. A deleted or expired upload is ErrNotFound too.
//   - Delete makes the upload invisible to Open atomically; a File already
//     opened stays readable until closed.
//   - Expire deletes every upload created before the given time and returns
//     how many it deleted; a failure on one upload does not stop the others.
//   - Owned lists exactly the uploads Open finds whose Owner is the given one.
type Store interface {
	// Put stores the bytes of r, at most limit of them (ErrTooLarge beyond),
	// for owner with contentType, and returns the new upload's Info.
	Put(ctx context.Context, owner, contentType string, r io.Reader, limit int64) (Info, error)
	// Open returns the content of upload id, which the caller closes, and its Info.
	Open(ctx context.Context, id string) (io.ReadSeekCloser, Info, error)
	// Delete removes upload id.
	Delete(ctx context.Context, id string) error
	// Expire deletes the uploads created before before and returns their number.
	Expire(ctx context.Context, before time.Time) (int, error)
	// Owned lists the uploads of owner, oldest first. It reads every
	// upload's metadata: for an erase or export now and then, not a
	// request path.
	Owned(ctx context.Context, owner string) ([]Info, error)
}

// owned is what Owned returns for owner's uploads out, found by a walk
// that ended with err: oldest first, then by id.
func owned(owner string, out []Info, err error) ([]Info, error) {
	if err != nil {
		return nil, fmt.Errorf("list media of %s: %w", owner, err)
	}
	slices.SortFunc(out, func(a, b Info) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// idBytes is the number of random bytes in an ID (PROTOCOL.md: 128 bits).
const idBytes = 16

// newID returns a fresh random upload ID.
func newID() (string, error) {
	b := make([]byte, idBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("new media id: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// validID reports whether id is exactly 32 lowercase hex digits. Only such
// ids ever reach the file system, which rules out path traversal, empty
// names, dot files and case-folding aliases.
func validID(id string) bool {
	if len(id) != 2*idBytes {
		return false
	}
	for i := range len(id) {
		c := id[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// precheck refuses a call op on id that no Store could serve: an id that
// is not one (ErrNotFound, as for any unknown id) or a context already done.
func precheck(ctx context.Context, op, id string) error {
	if !validID(id) {
		return ErrNotFound
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s media %s: %w", op, id, err)
	}
	return nil
}

// failures counts what an Expire sweep failed to do, which does not stop
// it, and keeps the first error.
type failures struct {
	n     int
	first error
}

// add counts one failure.
func (f *failures) add(err error) {
	if f.first == nil {
		f.first = err
	}
	f.n++
}

// result is the sweep's error: walkErr if the walk itself stopped, else
// the failures counted, nil when there were none.
func (f *failures) result(walkErr error) error {
	switch {
	case walkErr != nil:
		return fmt.Errorf("expire media: %w", walkErr)
	case f.n > 0:
		return fmt.Errorf("expire media: %d failures, first: %w", f.n, f.first)
	}
	return nil
}
