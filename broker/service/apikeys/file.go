package apikeys

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// FileName is the keys file in a node's data directory.
const FileName = "apikeys.json"

// File is the Store of one node: a JSON file that `chatd apikey` changes
// while the server runs (the server's Badger database admits one process
// only). The server reads it again whenever it changed, so that a key
// made or revoked works at once.
type File struct {
	path string

	mu   sync.Mutex
	keys map[string]Key
	// mod and size identify the version of the file keys came from.
	mod  time.Time
	size int64
}

// fileBody is the file's content.
type fileBody struct {
	Keys []Key `json:"keys"`
}

// NewFile returns the Store in path; the file need not exist yet.
func NewFile(path string) *File { return &File{path: path} }

// Get returns the key of id.
func (f *File) Get(id string) (Key, error) {
	if !validID(id) {
		return Key{}, ErrUnknown
	}
	keys, err := f.load()
	if err != nil {
		return Key{}, err
	}
	k, ok := keys[id]
	if !ok {
		return Key{}, ErrUnknown
	}
	return k, nil
}

// List returns every key, by ID.
func (f *File) List() ([]Key, error) {
	keys, err := f.load()
	if err != nil {
		return nil, err
	}
	out := make([]Key, 0, len(keys))
	for _, k := range keys {
		out = append(out, k)
	}
	slices.SortFunc(out, func(a, b Key) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Put adds or replaces k.
func (f *File) Put(k Key) error {
	return f.change(func(keys map[string]Key) error {
		keys[k.ID] = k
		return nil
	})
}

// Delete revokes the key of id.
func (f *File) Delete(id string) error {
	return f.change(func(keys map[string]Key) error {
		if _, ok := keys[id]; !ok {
			return ErrUnknown
		}
		delete(keys, id)
		return nil
	})
}

// load returns the keys of the file as it is now, reading it only when
// it changed since the last read: one stat per request.
func (f *File) load() (map[string]Key, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, err := os.Stat(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		f.keys, f.mod, f.size = map[string]Key{}, time.Time{}, -1
		return f.keys, nil
	}
	if err != nil {
		return nil, fmt.Errorf("API keys file: %w", err)
	}
	if f.keys != nil && st.ModTime().Equal(f.mod) && st.Size() == f.size {
		return f.keys, nil
	}
	keys, err := readKeys(f.path)
	if err != nil {
		return nil, err
	}
	f.keys, f.mod, f.size = keys, st.ModTime(), st.Size()
	return keys, nil
}

func readKeys(path string) (map[string]Key, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]Key{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("API keys file: %w", err)
	}
	var body fileBody
	if err := json.Unmarshal(b, &body); err != nil {
		return nil, fmt.Errorf("API keys file %s: %w", path, err)
	}
	keys := make(map[string]Key, len(body.Keys))
	for _, k := range body.Keys {
		keys[k.ID] = k
	}
	return keys, nil
}

// change applies fn to the keys under an exclusive lock of the file, so
// that two `chatd apikey` commands at once lose neither's change, and
// replaces the file in one rename, so that a reader sees the old keys or
// the new, never half a file.
func (f *File) change(fn func(map[string]Key) error) error {
	if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
		return fmt.Errorf("API keys directory: %w", err)
	}
	lock, err := os.OpenFile(f.path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("API keys lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("API keys lock: %w", err)
	}
	keys, err := readKeys(f.path)
	if err != nil {
		return err
	}
	if err := fn(keys); err != nil {
		return err
	}
	body := fileBody{Keys: make([]Key, 0, len(keys))}
	for _, k := range keys {
		body.Keys = append(body.Keys, k)
	}
	slices.SortFunc(body.Keys, func(a, b Key) int { return strings.Compare(a.ID, b.ID) })
	b, err := json.MarshalIndent(body, "", "  ")
	if err != nil {
		return fmt.Errorf("API keys: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.path), FileName+".*")
	if err != nil {
		return fmt.Errorf("API keys file: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("API keys file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("API keys file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("API keys file: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.path); err != nil {
		return fmt.Errorf("API keys file: %w", err)
	}
	return nil
}
