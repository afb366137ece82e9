package media

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
)

// Layout of an Objects bucket. It is the stream of a JetStream object store
// (ADR-20, the layout jetstream.ObjectStore reads), so `nats object` and
// jetstream.ObjectStore can inspect it:
//
//	OBJ_<bucket>                    the stream
//	$O.<bucket>.M.<base64url(id)>   one message: the upload's ObjectInfo
//	$O.<bucket>.C.<token>           the upload's chunks, chunkSize bytes but the last
//
// Put is written here rather than with jetstream.ObjectStore.Put, which
// publishes the metadata before the chunks are acknowledged (a failed chunk
// leaves a visible, broken object) and gives up its clean-up when ctx is
// cancelled (the chunks stay forever, named by nothing).
//
// An upload's metadata subject goes through these states, each change a
// rollup publish that expects the subject's previous sequence, so that
// racing writers (a slow Put, Delete, the Expire of another node) cannot
// overwrite each other:
//
//	uploading  an ObjectInfo marked Deleted: Open sees nothing. Published
//	           before the first chunk, so that chunks always have a
//	           metadata message naming them, even after a crash.
//	live       the committed ObjectInfo: the commit publish is what makes
//	           an upload visible, after every chunk is acknowledged.
//	deleted    an ObjectInfo marked Deleted, written by Delete, Expire or
//	           a failed Put. The chunks stay for deleteGrace, so that a
//	           download already opened can finish; Expire then purges
//	           them and the metadata.
//
// Expire turns an uploading marker whose chunks stopped arriving deleteGrace
// ago (its Put crashed) into a deleted one, whose chunks a later sweep purges.
const (
	// chunkSize is the size of every chunk but an upload's last: jetstream's
	// default, and small enough that one chunk is all a reader holds.
	chunkSize = 128 << 10
	// deleteGrace is how long the chunks of a deleted upload stay readable
	// for downloads opened before the delete, and how long an upload may
	// go without a chunk before Expire takes it for abandoned.
	deleteGrace = time.Hour
	// listBatch bounds how many metadata messages Expire holds at once.
	listBatch = 256
)

// Metadata keys of an upload's ObjectInfo.
const (
	mdOwner       = "chatd-owner"
	mdContentType = "chatd-content-type"
	mdCreated     = "chatd-created"
	// mdChunkSeqs lists the stream sequence of every chunk as runs
	// "first+count,...", so a reader fetches any chunk directly.
	mdChunkSeqs = "chatd-chunk-seqs"
	// mdState and mdSince are on markers only: why the ObjectInfo is
	// marked Deleted, and since when.
	mdState        = "chatd-state"
	mdSince        = "chatd-since"
	stateUploading = "uploading"
	stateDeleted   = "deleted"
)

// bucketRE is what JetStream accepts in an object store bucket name.
var bucketRE = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)

// Objects is the Store that keeps uploads in a replicated JetStream object
// store bucket, shared by the nodes of a cluster. An upload is durable
// once Put returns as far as JetStream's acknowledgement goes: on a quorum
// of the bucket's replicas (fsynced as the NATS servers are configured to).
//
// A download opened before its upload is deleted or expires stays readable
// for deleteGrace (an hour) after the deletion, not indefinitely as with
// Disk: the nodes of a cluster do not know each other's open files.
type Objects struct {
	// Now is the clock that stamps Created and the markers' times, and
	// that deletion's grace period is measured by; nil means time.Now.
	// Set it before the Objects is first used.
	Now func() time.Time

	js     jetstream.JetStream
	stream jetstream.Stream
	bucket string
	// grace is deleteGrace; tests shorten it.
	grace time.Duration
}

var _ Store = (*Objects)(nil)

// NewObjects returns an Objects keeping uploads in bucket on js, with
// replicas copies (1 to 5), creating the bucket's stream or updating its
// configuration. While JetStream cannot answer (a new cluster electing its
// leaders) it tries again until ctx ends, so ctx should have a deadline.
func NewObjects(ctx context.Context, js jetstream.JetStream, bucket string, replicas int) (*Objects, error) {
	if js == nil {
		return nil, errors.New("media objects: no JetStream")
	}
	if !bucketRE.MatchString(bucket) {
		return nil, fmt.Errorf("media objects: bucket %q: letters, digits, '-' and '_' only", bucket)
	}
	if replicas < 1 || replicas > 5 {
		return nil, fmt.Errorf("media objects: %d replicas: JetStream allows 1 to 5", replicas)
	}
	cfg := jetstream.StreamConfig{
		Name:        "OBJ_" + bucket,
		Description: "chatd media uploads",
		Subjects:    []string{"$O." + bucket + ".C.>", "$O." + bucket + ".M.>"},
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
		Discard:     jetstream.DiscardNew,
		MaxBytes:    -1,
		MaxMsgs:     -1,
		AllowRollup: true,
		// Unlike jetstream.CreateObjectStore: direct gets may be answered
		// by a replica that lags, and an upload must be found on every
		// node once its Put returned. Without them the leader answers.
		AllowDirect: false,
	}
	var stream jetstream.Stream
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
		stream, err = js.CreateOrUpdateStream(ctx, cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("media objects: create bucket %s: %w", bucket, err)
	}
	return &Objects{js: js, stream: stream, bucket: bucket, grace: deleteGrace}, nil
}

// now returns the current time by o.Now.
func (o *Objects) now() time.Time { return clock(o.Now) }

// Put implements Store: it publishes an uploading marker, then r chunk by
// chunk, each acknowledged before the next is read, hashing as it goes,
// and commits by replacing the marker with the upload's metadata.
func (o *Objects) Put(ctx context.Context, owner, contentType string, r io.Reader, limit int64) (info Info, err error) {
	if limit < 0 {
		return Info{}, fmt.Errorf("put media: negative limit %d", limit)
	}
	if err := ctx.Err(); err != nil {
		return Info{}, fmt.Errorf("put media: %w", err)
	}
	id, err := newID()
	if err != nil {
		return Info{}, err
	}
	token, err := newID()
	if err != nil {
		return Info{}, err
	}
	// Storage calls are not cut short by ctx: a publish abandoned half way
	// has an unknown outcome, which only the grace period clears. ctx is
	// checked at every read and before the commit instead. Without a
	// deadline each call is bounded by the JetStream context's timeout.
	sctx := context.WithoutCancel(ctx)
	u := &upload{o: o, id: id, token: token}
	defer func() {
		if err != nil && u.markerSeq != 0 {
			if aerr := u.abandon(sctx); aerr != nil {
				err = errors.Join(err, aerr)
			}
		}
	}()

	// Reading one byte past limit tells "exactly limit" from "too large"
	// without buffering anything.
	readLimit := limit
	if readLimit < math.MaxInt64 {
		readLimit++
	}
	src := io.LimitReader(ctxReader{ctx: ctx, r: r}, readLimit)
	h := sha256.New()
	buf := make([]byte, chunkSize)
	var (
		size int64
		seqs seqRuns
	)
	for {
		n, rerr := io.ReadFull(src, buf)
		if rerr != nil && !errors.Is(rerr, io.EOF) && !errors.Is(rerr, io.ErrUnexpectedEOF) {
			return Info{}, fmt.Errorf("read media upload: %w", rerr)
		}
		if n == 0 {
			break
		}
		size += int64(n)
		if size > limit {
			return Info{}, ErrTooLarge
		}
		if seqs.count() >= math.MaxUint32 {
			return Info{}, ErrTooLarge // ObjectInfo counts chunks in 32 bits
		}
		h.Write(buf[:n])
		seq, err := u.chunk(sctx, buf[:n])
		if err != nil {
			return Info{}, err
		}
		seqs.add(seq)
		if rerr != nil {
			break // a short chunk is the last
		}
	}
	// A client that went away while we stored gets no upload it cannot learn the id of.
	if err := ctx.Err(); err != nil {
		return Info{}, fmt.Errorf("put media: %w", err)
	}
	if err := u.mark(sctx); err != nil {
		return Info{}, err
	}
	sum := h.Sum(nil)
	info = Info{
		ID:          id,
		Size:        size,
		SHA256:      hex.EncodeToString(sum),
		ContentType: contentType,
		Created:     o.now().UTC(),
		Owner:       owner,
	}
	meta := &jetstream.ObjectInfo{
		ObjectMeta: jetstream.ObjectMeta{
			Name: id,
			Metadata: map[string]string{
				mdOwner:       owner,
				mdContentType: contentType,
				mdCreated:     info.Created.Format(time.RFC3339Nano),
				mdChunkSeqs:   seqs.String(),
			},
			Opts: &jetstream.ObjectMetaOptions{ChunkSize: chunkSize},
		},
		Bucket: o.bucket,
		NUID:   token,
		Size:   uint64(size),
		Chunks: uint32(seqs.count()),
		Digest: "SHA-256=" + base64.URLEncoding.EncodeToString(sum),
	}
	if _, err := o.publishMeta(sctx, meta, u.markerSeq); err != nil {
		// The commit's outcome may be unknown: abandon finds out.
		return Info{}, fmt.Errorf("commit media %s: %w", id, err)
	}
	return info, nil
}

// upload is the state of one Put.
type upload struct {
	o         *Objects
	id, token string
	// markerSeq is the sequence of the uploading marker, 0 before it is out.
	markerSeq uint64
	// unsure is set when a chunk publish failed without a JetStream answer:
	// the chunk may still be stored later, so only the grace period may
	// purge the chunks.
	unsure bool
}

// mark publishes the uploading marker unless it is out already.
func (u *upload) mark(ctx context.Context) error {
	if u.markerSeq != 0 {
		return nil
	}
	// Expecting no message yet makes an id collision a failure, not an overwrite.
	seq, err := u.o.publishMeta(ctx, u.o.marker(u.id, u.token, stateUploading), 0)
	if err != nil {
		return fmt.Errorf("put media %s: %w", u.id, err)
	}
	u.markerSeq = seq
	return nil
}

// chunk stores one chunk after the marker and returns its stream sequence.
func (u *upload) chunk(ctx context.Context, data []byte) (uint64, error) {
	if err := u.mark(ctx); err != nil {
		return 0, err
	}
	ack, err := u.o.js.PublishMsg(ctx, &nats.Msg{Subject: u.o.chunkSubject(u.token), Data: data},
		jetstream.WithExpectStream(u.o.streamName()))
	if err != nil {
		var apiErr *jetstream.APIError
		if !errors.As(err, &apiErr) {
			u.unsure = true
		}
		return 0, fmt.Errorf("put media %s: store chunk: %w", u.id, err)
	}
	return ack.Sequence, nil
}

// abandon makes sure a failed upload can never become visible, and removes
// its chunks and metadata unless a chunk is still possibly on its way.
func (u *upload) abandon(ctx context.Context) error {
	seq, err := u.o.publishMeta(ctx, u.o.marker(u.id, u.token, stateDeleted), u.markerSeq)
	if isWrongLastSeq(err) {
		// An unanswered commit was stored after all, or Expire took the
		// upload for abandoned: deal with whatever the subject holds now.
		seq, err = u.o.retire(ctx, u.id, u.token)
	}
	if err != nil {
		return fmt.Errorf("abandon media upload %s (Expire removes it later): %w", u.id, err)
	}
	if u.unsure {
		return nil
	}
	return u.o.purge(ctx, u.id, u.token, seq)
}

// retire replaces the metadata of upload id, if it still names the chunks
// of token, with a deleted marker, and returns the sequence of the marker
// now in place, or 0 when the subject is empty.
func (o *Objects) retire(ctx context.Context, id, token string) (uint64, error) {
	m, meta, err := o.lastMeta(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if meta.NUID != token {
		return 0, fmt.Errorf("media %s: metadata names chunks %q, not %q", id, meta.NUID, token)
	}
	if meta.Deleted && meta.Metadata[mdState] == stateDeleted {
		return m.Sequence, nil
	}
	return o.publishMeta(ctx, o.marker(id, token, stateDeleted), m.Sequence)
}

// Open implements Store. The returned file reads one chunk at a time, and
// seeks by fetching the chunk at the new offset: no more than a chunk is
// held in memory. Its reads are not bound to ctx, like a file's.
func (o *Objects) Open(ctx context.Context, id string) (io.ReadSeekCloser, Info, error) {
	if err := precheck(ctx, "open", id); err != nil {
		return nil, Info{}, err
	}
	_, meta, err := o.lastMeta(ctx, id)
	if err != nil {
		return nil, Info{}, err
	}
	if meta.Deleted {
		return nil, Info{}, ErrNotFound
	}
	info, seqs, digest, err := infoOf(id, meta)
	if err != nil {
		return nil, Info{}, err
	}
	f := &objectFile{
		ctx:    context.WithoutCancel(ctx),
		stream: o.stream,
		id:     id,
		subj:   o.chunkSubject(meta.NUID),
		size:   info.Size,
		chunk:  int64(meta.Opts.ChunkSize),
		seqs:   seqs,
		digest: digest,
		cur:    -1,
		hash:   sha256.New(),
	}
	return f, info, nil
}

// Delete implements Store. The chunks stay readable for the files opened
// before, until an Expire deleteGrace later purges them.
func (o *Objects) Delete(ctx context.Context, id string) error {
	if err := precheck(ctx, "delete", id); err != nil {
		return err
	}
	m, meta, err := o.lastMeta(ctx, id)
	if err != nil {
		return err
	}
	if meta.Deleted {
		return ErrNotFound
	}
	return o.remove(ctx, id, meta.NUID, m.Sequence)
}

// remove replaces the live metadata of upload id, at sequence seq, with a
// deleted marker; ErrNotFound when someone else changed it first.
func (o *Objects) remove(ctx context.Context, id, token string, seq uint64) error {
	_, err := o.publishMeta(ctx, o.marker(id, token, stateDeleted), seq)
	if isWrongLastSeq(err) {
		return ErrNotFound // deleted concurrently
	}
	if err != nil {
		return fmt.Errorf("delete media %s: %w", id, err)
	}
	return nil
}

// Expire implements Store. It also purges the chunks and metadata of
// uploads deleted more than deleteGrace ago, and retires uploads whose
// Put stopped sending chunks that long ago.
func (o *Objects) Expire(ctx context.Context, before time.Time) (int, error) {
	var (
		deleted int
		fails   failures
	)
	fail := fails.add
	prefix := o.metaSubject("")
	err := o.eachMeta(ctx, func(m jetstream.Msg, seq uint64) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		name, err := base64.URLEncoding.DecodeString(strings.TrimPrefix(m.Subject(), prefix))
		if err != nil || !validID(string(name)) {
			return nil // not an upload of ours
		}
		id := string(name)
		var meta jetstream.ObjectInfo
		if err := json.Unmarshal(m.Data(), &meta); err != nil {
			fail(fmt.Errorf("read media %s metadata: %w", id, err))
			return nil
		}
		if meta.Deleted {
			if err := o.collect(ctx, id, &meta, seq); err != nil {
				fail(err)
			}
			return nil
		}
		info, _, _, err := infoOf(id, &meta)
		if err != nil {
			fail(err)
			return nil
		}
		if !info.Created.Before(before) {
			return nil
		}
		if err := o.remove(ctx, id, meta.NUID, seq); errors.Is(err, ErrNotFound) {
			return nil
		} else if err != nil {
			fail(err)
			return nil
		}
		deleted++
		return nil
	})
	return deleted, fails.result(err)
}

// Owned implements Store.
func (o *Objects) Owned(ctx context.Context, owner string) ([]Info, error) {
	var out []Info
	prefix := o.metaSubject("")
	err := o.eachMeta(ctx, func(m jetstream.Msg, _ uint64) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		name, err := base64.URLEncoding.DecodeString(strings.TrimPrefix(m.Subject(), prefix))
		if err != nil || !validID(string(name)) {
			return nil // not an upload of ours
		}
		var meta jetstream.ObjectInfo
		if err := json.Unmarshal(m.Data(), &meta); err != nil {
			return fmt.Errorf("read media %s metadata: %w", name, err)
		}
		if meta.Deleted {
			return nil
		}
		info, _, _, err := infoOf(string(name), &meta)
		if err != nil {
			return err
		}
		if info.Owner == owner {
			out = append(out, info)
		}
		return nil
	})
	return owned(owner, out, err)
}

// collect handles the marker meta of upload id at sequence seq: it purges
// a deleted upload once deleteGrace is over, and retires an upload whose
// chunks stopped coming deleteGrace ago.
func (o *Objects) collect(ctx context.Context, id string, meta *jetstream.ObjectInfo, seq uint64) error {
	now := o.now()
	since, err := time.Parse(time.RFC3339Nano, meta.Metadata[mdSince])
	if err != nil {
		// Not one of our markers (jetstream.ObjectStore.Delete writes
		// such, purging the chunks at once): it can go.
		since = time.Time{}
	}
	if now.Sub(since) < o.grace {
		return nil
	}
	if meta.Metadata[mdState] == stateUploading {
		last, err := o.stream.GetLastMsgForSubject(ctx, o.chunkSubject(meta.NUID))
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Errorf("media upload %s: last chunk: %w", id, err)
		}
		if err == nil && now.Sub(last.Time) < o.grace {
			return nil // a slow upload, still going
		}
		// Its Put's commit now fails. The chunks go a grace period later,
		// when any chunk publish of it still in flight has landed.
		_, err = o.publishMeta(ctx, o.marker(id, meta.NUID, stateDeleted), seq)
		if err != nil && !isWrongLastSeq(err) {
			return fmt.Errorf("retire abandoned media upload %s: %w", id, err)
		}
		return nil
	}
	return o.purge(ctx, id, meta.NUID, seq)
}

// purge removes the chunks of token and then the metadata of upload id up
// to sequence seq (none when 0): what is left after a failure is still
// named by its metadata, for the next Expire.
func (o *Objects) purge(ctx context.Context, id, token string, seq uint64) error {
	if token != "" {
		if err := o.stream.Purge(ctx, jetstream.WithPurgeSubject(o.chunkSubject(token))); err != nil {
			return fmt.Errorf("purge media %s chunks: %w", id, err)
		}
	}
	if seq == 0 {
		return nil
	}
	// Up to seq only: a newer message is someone else's business.
	err := o.stream.Purge(ctx, jetstream.WithPurgeSubject(o.metaSubject(id)), jetstream.WithPurgeSequence(seq+1))
	if err != nil {
		return fmt.Errorf("purge media %s metadata: %w", id, err)
	}
	return nil
}

// eachMeta calls fn with the current metadata message of every object and
// its stream sequence, in batches, stopping at the first error of fn.
// Objects changed after the call began may be seen in either state or not
// at all.
func (o *Objects) eachMeta(ctx context.Context, fn func(m jetstream.Msg, seq uint64) error) error {
	all := o.metaSubject(">")
	last, err := o.stream.GetLastMsgForSubject(ctx, all)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil // an empty bucket
	}
	if err != nil {
		return fmt.Errorf("list media: %w", err)
	}
	cons, err := o.stream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		DeliverPolicy:     jetstream.DeliverLastPerSubjectPolicy,
		AckPolicy:         jetstream.AckNonePolicy,
		FilterSubject:     all,
		InactiveThreshold: time.Minute,
		MemoryStorage:     true,
	})
	if err != nil {
		return fmt.Errorf("list media: %w", err)
	}
	defer func() {
		// A consumer left behind goes after InactiveThreshold anyway.
		_ = o.stream.DeleteConsumer(context.WithoutCancel(ctx), cons.CachedInfo().Name)
	}()
	for {
		batch, err := cons.FetchNoWait(listBatch)
		if err != nil {
			return fmt.Errorf("list media: %w", err)
		}
		var (
			n    int
			done bool
			ferr error
		)
		// Draining the batch even after an error lets its goroutine end.
		for m := range batch.Messages() {
			n++
			if done || ferr != nil {
				continue
			}
			md, err := m.Metadata()
			if err != nil {
				ferr = fmt.Errorf("list media: %w", err)
				continue
			}
			// Messages after last were written during the sweep, by it or others.
			if md.Sequence.Stream > last.Sequence {
				done = true
				continue
			}
			if err := fn(m, md.Sequence.Stream); err != nil {
				ferr = err
				continue
			}
			done = md.Sequence.Stream == last.Sequence || md.NumPending == 0
		}
		if ferr != nil {
			return ferr
		}
		if err := batch.Error(); err != nil {
			return fmt.Errorf("list media: %w", err)
		}
		if done || n == 0 {
			return nil
		}
	}
}

// publishMeta publishes meta as the only message of its subject, expecting
// the subject's last sequence to be seq (0: no message), and returns the
// new message's sequence.
func (o *Objects) publishMeta(ctx context.Context, meta *jetstream.ObjectInfo, seq uint64) (uint64, error) {
	data, err := json.Marshal(meta)
	if err != nil {
		return 0, fmt.Errorf("encode media %s metadata: %w", meta.Name, err)
	}
	m := nats.NewMsg(o.metaSubject(meta.Name))
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	m.Data = data
	ack, err := o.js.PublishMsg(ctx, m,
		jetstream.WithExpectStream(o.streamName()),
		jetstream.WithExpectLastSequencePerSubject(seq))
	if err != nil {
		return 0, fmt.Errorf("store media %s metadata: %w", meta.Name, err)
	}
	return ack.Sequence, nil
}

// marker returns the metadata of upload id with chunks token, invisible
// to Open, in state.
func (o *Objects) marker(id, token, state string) *jetstream.ObjectInfo {
	return &jetstream.ObjectInfo{
		ObjectMeta: jetstream.ObjectMeta{
			Name: id,
			Metadata: map[string]string{
				mdState: state,
				mdSince: o.now().UTC().Format(time.RFC3339Nano),
			},
		},
		Bucket:  o.bucket,
		NUID:    token,
		Deleted: true,
	}
}

// lastMeta returns the metadata message of upload id, whose format the
// caller has checked, and its decoded ObjectInfo.
func (o *Objects) lastMeta(ctx context.Context, id string) (*jetstream.RawStreamMsg, *jetstream.ObjectInfo, error) {
	m, err := o.stream.GetLastMsgForSubject(ctx, o.metaSubject(id))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil, ErrNotFound
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read media %s metadata: %w", id, err)
	}
	var meta jetstream.ObjectInfo
	if err := json.Unmarshal(m.Data, &meta); err != nil {
		return nil, nil, fmt.Errorf("read media %s metadata: %w", id, err)
	}
	if meta.Name != id {
		return nil, nil, fmt.Errorf("read media %s metadata: holds name %q", id, meta.Name)
	}
	return m, &meta, nil
}

// infoOf checks the live metadata of upload id and returns its Info, the
// sequences of its chunks and its SHA-256.
func infoOf(id string, meta *jetstream.ObjectInfo) (Info, seqRuns, []byte, error) {
	bad := func(format string, args ...any) (Info, seqRuns, []byte, error) {
		return Info{}, seqRuns{}, nil, fmt.Errorf("read media %s metadata: %s", id, fmt.Sprintf(format, args...))
	}
	if meta.Name != id {
		return bad("holds name %q", meta.Name)
	}
	if meta.Size > math.MaxInt64 {
		return bad("size %d", meta.Size)
	}
	if meta.Opts == nil || meta.Opts.ChunkSize == 0 {
		return bad("no chunk size")
	}
	cs := uint64(meta.Opts.ChunkSize)
	if want := (meta.Size + cs - 1) / cs; uint64(meta.Chunks) != want {
		return bad("%d chunks for %d bytes", meta.Chunks, meta.Size)
	}
	digest, err := jetstream.DecodeObjectDigest(meta.Digest)
	if err != nil || len(digest) != sha256.Size || !strings.HasPrefix(meta.Digest, "SHA-256=") {
		return bad("digest %q", meta.Digest)
	}
	created, err := time.Parse(time.RFC3339Nano, meta.Metadata[mdCreated])
	if err != nil {
		return bad("created %q", meta.Metadata[mdCreated])
	}
	seqs, err := parseSeqRuns(meta.Metadata[mdChunkSeqs])
	if err != nil || seqs.count() != uint64(meta.Chunks) {
		return bad("chunk sequences %q", meta.Metadata[mdChunkSeqs])
	}
	info := Info{
		ID:          id,
		Size:        int64(meta.Size),
		SHA256:      hex.EncodeToString(digest),
		ContentType: meta.Metadata[mdContentType],
		Created:     created,
		Owner:       meta.Metadata[mdOwner],
	}
	return info, seqs, digest, nil
}

// streamName returns the name of the bucket's stream.
func (o *Objects) streamName() string { return "OBJ_" + o.bucket }

// metaSubject returns the metadata subject of upload id; "" gives the prefix.
func (o *Objects) metaSubject(id string) string {
	if id == "" || id == ">" {
		return "$O." + o.bucket + ".M." + id
	}
	return "$O." + o.bucket + ".M." + base64.URLEncoding.EncodeToString([]byte(id))
}

// chunkSubject returns the subject of the chunks of token.
func (o *Objects) chunkSubject(token string) string {
	return "$O." + o.bucket + ".C." + token
}

// isWrongLastSeq reports whether err is JetStream refusing a publish whose
// expected last subject sequence did not match.
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// seqRuns lists stream sequences compactly: the chunks of one upload are
// mostly consecutive, interleaved only with concurrent uploads.
type seqRuns struct {
	first []uint64 // first sequence of each run
	end   []uint64 // index of the chunk after each run, cumulative
}

// add appends seq.
func (s *seqRuns) add(seq uint64) {
	n := len(s.first)
	if n > 0 && s.first[n-1]+(s.end[n-1]-s.start(n-1)) == seq {
		s.end[n-1]++
		return
	}
	s.first = append(s.first, seq)
	s.end = append(s.end, s.count()+1)
}

// start returns the index of the first chunk of run i.
func (s *seqRuns) start(i int) uint64 {
	if i == 0 {
		return 0
	}
	return s.end[i-1]
}

// count returns how many sequences s holds.
func (s *seqRuns) count() uint64 {
	if len(s.end) == 0 {
		return 0
	}
	return s.end[len(s.end)-1]
}

// at returns the sequence of chunk i < count().
func (s *seqRuns) at(i uint64) uint64 {
	r := sort.Search(len(s.end), func(r int) bool { return s.end[r] > i })
	return s.first[r] + (i - s.start(r))
}

// String encodes s as "first+count,...".
func (s *seqRuns) String() string {
	var b strings.Builder
	for i := range s.first {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatUint(s.first[i], 10))
		b.WriteByte('+')
		b.WriteString(strconv.FormatUint(s.end[i]-s.start(i), 10))
	}
	return b.String()
}

// parseSeqRuns decodes what seqRuns.String encodes.
func parseSeqRuns(v string) (seqRuns, error) {
	var s seqRuns
	if v == "" {
		return s, nil
	}
	for run := range strings.SplitSeq(v, ",") {
		a, b, ok := strings.Cut(run, "+")
		first, err1 := strconv.ParseUint(a, 10, 64)
		n, err2 := strconv.ParseUint(b, 10, 64)
		if !ok || err1 != nil || err2 != nil || first == 0 || n == 0 || first > math.MaxUint64-n || n > math.MaxUint32 {
			return seqRuns{}, fmt.Errorf("bad run %q", run)
		}
		s.first = append(s.first, first)
		s.end = append(s.end, s.count()+n)
	}
	return s, nil
}

// objectFile reads an upload of Objects. Like an *os.File it is not safe
// for concurrent use.
type objectFile struct {
	ctx    context.Context
	stream jetstream.Stream
	id     string
	subj   string
	size   int64
	chunk  int64
	seqs   seqRuns
	digest []byte

	pos  int64
	cur  int64  // index of the chunk in data, -1 for none
	data []byte // chunk cur
	// hash covers the bytes [0, hashed) as read in order, to check the
	// digest when a read reaches the end without gaps.
	hash   hash.Hash
	hashed int64
	err    error // sticky: corruption or closed
}

// Read implements io.Reader.
func (f *objectFile) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	if f.pos >= f.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	idx := f.pos / f.chunk
	if idx != f.cur {
		if err := f.load(idx); err != nil {
			return 0, err
		}
	}
	n := copy(p, f.data[f.pos-idx*f.chunk:])
	if f.hashed == f.pos {
		f.hash.Write(p[:n])
		f.hashed += int64(n)
		if f.hashed == f.size && !bytes.Equal(f.hash.Sum(nil), f.digest) {
			f.err = fmt.Errorf("read media %s: content does not match its SHA-256", f.id)
			return n, f.err
		}
	}
	f.pos += int64(n)
	return n, nil
}

// load fetches chunk idx.
func (f *objectFile) load(idx int64) error {
	m, err := f.stream.GetMsg(f.ctx, f.seqs.at(uint64(idx)))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		// Purged: deleted longer than deleteGrace ago.
		return fmt.Errorf("read media %s: chunk %d is gone", f.id, idx)
	}
	if err != nil {
		return fmt.Errorf("read media %s: chunk %d: %w", f.id, idx, err)
	}
	want := min(f.chunk, f.size-idx*f.chunk)
	if m.Subject != f.subj || int64(len(m.Data)) != want {
		return fmt.Errorf("read media %s: chunk %d: message %d on %s with %d bytes, want %s with %d",
			f.id, idx, m.Sequence, m.Subject, len(m.Data), f.subj, want)
	}
	f.data, f.cur = m.Data, idx
	return nil
}

// Seek implements io.Seeker. It only moves the offset; the next Read
// fetches the chunk there.
func (f *objectFile) Seek(offset int64, whence int) (int64, error) {
	if errors.Is(f.err, os.ErrClosed) {
		return 0, f.err
	}
	var base int64
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		base = f.pos
	case io.SeekEnd:
		base = f.size
	default:
		return 0, fmt.Errorf("seek media %s: bad whence %d", f.id, whence)
	}
	if (offset > 0 && base > math.MaxInt64-offset) || base+offset < 0 {
		return 0, fmt.Errorf("seek media %s: offset %d from %d out of range", f.id, offset, base)
	}
	f.pos = base + offset
	return f.pos, nil
}

// Close implements io.Closer. The file holds nothing in JetStream: closing
// drops the buffered chunk.
func (f *objectFile) Close() error {
	if errors.Is(f.err, os.ErrClosed) {
		return f.err
	}
	f.err = fmt.Errorf("media %s: %w", f.id, os.ErrClosed)
	f.data = nil
	return nil
}
