package media

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Layout of a Disk directory:
//
//	<id>/data       the file
//	<id>/meta.json  its Info as JSON
//	.tmp-*/         an upload being written (or left by a crash)
//	.trash-<id>/    an upload being deleted (or left by a crash)
//
// An upload is built in a .tmp- directory, both files fsynced, and the
// directory is then renamed to <id>. That one rename is the commit: a crash
// before it leaves only a .tmp- directory, never a half upload under a real
// id, and an upload's data and metadata appear together. Delete is the
// reverse: rename to .trash-<id> (the upload is gone for readers at once),
// then remove.
const (
	dataFile    = "data"
	metaFile    = "meta.json"
	tmpPrefix   = ".tmp-"
	trashPrefix = ".trash-"
)

// readDirBatch bounds how many directory entries are in memory at once, so
// sweeping a directory of millions of uploads stays small.
const readDirBatch = 256

// Disk is the Store that keeps uploads in a local directory. A directory
// belongs to one Disk at a time: NewDisk removes unfinished uploads it finds.
type Disk struct {
	// Now is the clock that stamps Created on new uploads; nil means
	// time.Now. Set it before the Disk is first used.
	Now func() time.Time

	dir string
}

var _ Store = (*Disk)(nil)

// NewDisk returns a Disk keeping uploads in dir, creating dir if needed and
// removing what a crash left of unfinished uploads and deletions.
func NewDisk(dir string) (*Disk, error) {
	if dir == "" {
		return nil, errors.New("media dir: empty path")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create media dir: %w", err)
	}
	var errs []error
	err := eachEntry(dir, func(name string) error {
		if strings.HasPrefix(name, tmpPrefix) || strings.HasPrefix(name, trashPrefix) {
			if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
				errs = append(errs, fmt.Errorf("remove leftover: %w", err))
			}
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("open media dir: %w", err)
	}
	return &Disk{dir: dir}, nil
}

// now returns the current time by d.Now.
func (d *Disk) now() time.Time { return clock(d.Now) }

// Put implements Store: it streams r into a temporary directory, hashing as
// it writes, fsyncs, and commits by renaming the directory to the new id.
func (d *Disk) Put(ctx context.Context, owner, contentType string, r io.Reader, limit int64) (info Info, err error) {
	if limit < 0 {
		return Info{}, fmt.Errorf("put media: negative limit %d", limit)
	}
	id, err := newID()
	if err != nil {
		return Info{}, err
	}
	tmp, err := os.MkdirTemp(d.dir, tmpPrefix)
	if err != nil {
		return Info{}, fmt.Errorf("put media: %w", err)
	}
	defer func() {
		// After a successful rename tmp no longer exists and this is a no-op.
		if rmErr := os.RemoveAll(tmp); rmErr != nil {
			err = errors.Join(err, fmt.Errorf("remove unfinished upload: %w", rmErr))
		}
	}()
	size, sum, err := writeData(ctx, filepath.Join(tmp, dataFile), r, limit)
	if err != nil {
		return Info{}, err
	}
	info = Info{
		ID:          id,
		Size:        size,
		SHA256:      sum,
		ContentType: contentType,
		Created:     d.now().UTC(),
		Owner:       owner,
	}
	if err := writeMeta(filepath.Join(tmp, metaFile), info); err != nil {
		return Info{}, err
	}
	// The entries inside tmp must be durable before the rename publishes them.
	if err := syncDir(tmp); err != nil {
		return Info{}, err
	}
	// A client that went away while we fsynced gets no upload it cannot learn the id of.
	if err := ctx.Err(); err != nil {
		return Info{}, fmt.Errorf("put media: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(d.dir, id)); err != nil {
		return Info{}, fmt.Errorf("commit media: %w", err)
	}
	if err := syncDir(d.dir); err != nil {
		// Without the directory fsync the upload might vanish on power loss
		// after we reported it stored; take it back so the client retries.
		if delErr := d.remove(id); delErr != nil {
			err = errors.Join(err, delErr)
		}
		return Info{}, fmt.Errorf("commit media: %w", err)
	}
	return info, nil
}

// Open implements Store.
func (d *Disk) Open(ctx context.Context, id string) (io.ReadSeekCloser, Info, error) {
	if err := precheck(ctx, "open", id); err != nil {
		return nil, Info{}, err
	}
	info, err := d.readMeta(id)
	if err != nil {
		return nil, Info{}, err
	}
	f, err := os.Open(filepath.Join(d.dir, id, dataFile))
	if errors.Is(err, fs.ErrNotExist) {
		// Deleted between reading the metadata and opening the data.
		return nil, Info{}, ErrNotFound
	}
	if err != nil {
		return nil, Info{}, fmt.Errorf("open media %s: %w", id, err)
	}
	st, err := f.Stat()
	if err == nil && st.Size() != info.Size {
		err = fmt.Errorf("size %d on disk, %d in metadata", st.Size(), info.Size)
	}
	if err != nil {
		return nil, Info{}, errors.Join(fmt.Errorf("open media %s: %w", id, err), f.Close())
	}
	return f, info, nil
}

// Delete implements Store.
func (d *Disk) Delete(ctx context.Context, id string) error {
	if err := precheck(ctx, "delete", id); err != nil {
		return err
	}
	return d.remove(id)
}

// Expire implements Store. It also finishes deletions that failed half way.
func (d *Disk) Expire(ctx context.Context, before time.Time) (int, error) {
	var (
		deleted int
		fails   failures
	)
	fail := fails.add
	err := eachEntry(d.dir, func(name string) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch {
		case validID(name):
			info, err := d.readMeta(name)
			if errors.Is(err, ErrNotFound) {
				return nil // deleted while we swept
			}
			if err != nil {
				fail(err)
				return nil
			}
			if !info.Created.Before(before) {
				return nil
			}
			if err := d.remove(name); errors.Is(err, ErrNotFound) {
				return nil
			} else if err != nil {
				fail(err)
				return nil
			}
			deleted++
		case strings.HasPrefix(name, trashPrefix):
			if err := os.RemoveAll(filepath.Join(d.dir, name)); err != nil {
				fail(fmt.Errorf("remove deleted media: %w", err))
			}
		}
		return nil
	})
	return deleted, fails.result(err)
}

// Owned implements Store.
func (d *Disk) Owned(ctx context.Context, owner string) ([]Info, error) {
	var out []Info
	err := eachEntry(d.dir, func(name string) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !validID(name) {
			return nil
		}
		info, err := d.readMeta(name)
		switch {
		case errors.Is(err, ErrNotFound):
			return nil // deleted meanwhile
		case err != nil:
			return err
		case info.Owner == owner:
			out = append(out, info)
		}
		return nil
	})
	return owned(owner, out, err)
}

// remove deletes upload id, whose format the caller has checked.
func (d *Disk) remove(id string) error {
	trash := filepath.Join(d.dir, trashPrefix+id)
	if err := os.Rename(filepath.Join(d.dir, id), trash); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return ErrNotFound
		}
		return fmt.Errorf("delete media %s: %w", id, err)
	}
	// No directory fsync: if the rename is lost in a power cut the upload
	// comes back and the next Expire deletes it again. A failed RemoveAll
	// is retried by Expire too; readers no longer see the upload either way.
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("delete media %s: %w", id, err)
	}
	return nil
}

// readMeta reads the Info of upload id, whose format the caller has checked.
func (d *Disk) readMeta(id string) (Info, error) {
	b, err := os.ReadFile(filepath.Join(d.dir, id, metaFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Info{}, ErrNotFound
	}
	if err != nil {
		return Info{}, fmt.Errorf("read media %s metadata: %w", id, err)
	}
	var info Info
	if err := json.Unmarshal(b, &info); err != nil {
		return Info{}, fmt.Errorf("read media %s metadata: %w", id, err)
	}
	if info.ID != id {
		return Info{}, fmt.Errorf("read media %s metadata: holds id %q", id, info.ID)
	}
	return info, nil
}

// writeData copies r to a new file at path, at most limit bytes, and returns
// the size and hex SHA-256 of what it wrote.
func writeData(ctx context.Context, path string, r io.Reader, limit int64) (int64, string, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, "", fmt.Errorf("create media file: %w", err)
	}
	h := sha256.New()
	// Reading one byte past limit tells "exactly limit" from "too large"
	// without buffering anything.
	readLimit := limit
	if readLimit < math.MaxInt64 {
		readLimit++
	}
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(ctxReader{ctx: ctx, r: r}, readLimit))
	switch {
	case err != nil:
		err = fmt.Errorf("write media file: %w", err)
	case n > limit:
		err = ErrTooLarge
	default:
		if err = f.Sync(); err != nil {
			err = fmt.Errorf("sync media file: %w", err)
		}
	}
	if cerr := f.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("close media file: %w", cerr)
	}
	if err != nil {
		return 0, "", err
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}

// writeMeta writes info as JSON to a new file at path and fsyncs it.
func writeMeta(path string, info Info) error {
	b, err := json.Marshal(info)
	if err != nil {
		return fmt.Errorf("encode media metadata: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create media metadata: %w", err)
	}
	if _, err = f.Write(b); err != nil {
		err = fmt.Errorf("write media metadata: %w", err)
	} else if err = f.Sync(); err != nil {
		err = fmt.Errorf("sync media metadata: %w", err)
	}
	if cerr := f.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("close media metadata: %w", cerr)
	}
	return err
}

// syncDir fsyncs directory dir so that entries created or renamed in it
// survive power loss.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync media dir: %w", err)
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync media dir: %w", err)
	}
	return nil
}

// eachEntry calls fn with the name of every entry of dir, reading the
// directory in batches; it stops at the first error fn returns.
func eachEntry(dir string, fn func(name string) error) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("list media dir: %w", err)
	}
	defer f.Close() // read-only: a close error cannot lose data
	for {
		entries, err := f.ReadDir(readDirBatch)
		for _, e := range entries {
			if err := fn(e.Name()); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("list media dir: %w", err)
		}
	}
}

// ctxReader fails reads once ctx is done, so that an upload stops when its
// request is cancelled even if the body keeps arriving.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

// Read implements io.Reader.
func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
