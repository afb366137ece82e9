package jsqueue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The few JetStream API calls the jetstream package does not offer in the
// form needed here: a message get that only the stream leader answers
// (jetstream.Stream.GetMsg switches to direct gets, which any replica
// answers, when a stream allows them), a direct get of a batch, and a purge
// that reports how many messages it removed.

const apiPrefix = "$JS.API."

// errNotFound is a get that found no message.
var errNotFound = errors.New("no message found")

// msgGetRequest is JetStream's JSApiMsgGetRequest, the fields used here.
type msgGetRequest struct {
	Seq     uint64 `json:"seq,omitempty"`
	LastFor string `json:"last_by_subj,omitempty"`
	NextFor string `json:"next_by_subj,omitempty"`
	Batch   int    `json:"batch,omitempty"`
	UpToSeq uint64 `json:"up_to_seq,omitempty"`
}

// storedMsg is one message as the leader's get returns it.
type storedMsg struct {
	Subject  string `json:"subject"`
	Sequence uint64 `json:"seq"`
	Header   []byte `json:"hdrs,omitempty"`
	Data     []byte `json:"data,omitempty"`
}

type apiResponse struct {
	Error *jetstream.APIError `json:"error,omitempty"`
}

type msgGetResponse struct {
	apiResponse
	Message *storedMsg `json:"message,omitempty"`
}

type purgeRequest struct {
	Sequence uint64 `json:"seq,omitempty"`
	Subject  string `json:"filter,omitempty"`
}

type purgeResponse struct {
	apiResponse
	Purged uint64 `json:"purged"`
}

// request sends a JSON API request and decodes the JSON answer into resp.
func request(ctx context.Context, nc *nats.Conn, subj string, req any, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode %s: %w", subj, err)
	}
	m, err := nc.RequestWithContext(ctx, subj, body)
	if err != nil {
		return fmt.Errorf("%s: %w", subj, err)
	}
	if err := json.Unmarshal(m.Data, resp); err != nil {
		return fmt.Errorf("decode %s answer: %w", subj, err)
	}
	return nil
}

// leaderGet returns one message as the stream's leader sees it, so that
// it reflects every write acknowledged before the call.
func leaderGet(ctx context.Context, nc *nats.Conn, stream string, req msgGetRequest) (*storedMsg, error) {
	var resp msgGetResponse
	if err := request(ctx, nc, apiPrefix+"STREAM.MSG.GET."+stream, req, &resp); err != nil {
		return nil, err
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, errNotFound
		}
		return nil, fmt.Errorf("get from %s: %w", stream, resp.Error)
	}
	if resp.Message == nil {
		return nil, fmt.Errorf("get from %s: answer without a message", stream)
	}
	return resp.Message, nil
}

// purge removes the messages of subject below seq and returns how many.
func purge(ctx context.Context, nc *nats.Conn, stream, subject string, seq uint64) (uint64, error) {
	var resp purgeResponse
	err := request(ctx, nc, apiPrefix+"STREAM.PURGE."+stream, purgeRequest{Sequence: seq, Subject: subject}, &resp)
	if err != nil {
		return 0, err
	}
	if resp.Error != nil {
		return 0, fmt.Errorf("purge %s below %d: %w", subject, seq, resp.Error)
	}
	return resp.Purged, nil
}

// directBatch asks one replica of stream for up to req.Batch messages on
// req.NextFor from req.Seq in one request. The replica may lag the leader:
// callers check the answer against what the leader told them.
func directBatch(ctx context.Context, nc *nats.Conn, stream string, req msgGetRequest) ([]*nats.Msg, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode direct get: %w", err)
	}
	inbox := nc.NewInbox()
	// A channel sized to the answer: SubscribeSync's would be sized for
	// 65,536 messages, half a megabyte allocated and cleared per read.
	ch := make(chan *nats.Msg, max(req.Batch, 1)+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, fmt.Errorf("direct get from %s: %w", stream, err)
	}
	defer sub.Unsubscribe() //nolint:errcheck // only fails on a closed connection, which the wait below reports
	if err := nc.PublishRequest(apiPrefix+"DIRECT.GET."+stream, inbox, body); err != nil {
		return nil, fmt.Errorf("direct get from %s: %w", stream, err)
	}
	var out []*nats.Msg
	for {
		var m *nats.Msg
		select {
		case m = <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("direct get from %s: %w", stream, ctx.Err())
		}
		status := m.Header.Get("Status")
		switch status {
		case "":
			out = append(out, m)
			continue
		case "204": // end of batch
			return out, nil
		case "404":
			return out, nil
		case "503":
			return nil, fmt.Errorf("direct get from %s: %w", stream, nats.ErrNoResponders)
		}
		return nil, fmt.Errorf("direct get from %s: status %s %s", stream, status, m.Header.Get("Description"))
	}
}

// seqOf returns the stream sequence of a message from a direct get.
func seqOf(m *nats.Msg) (uint64, error) {
	s := m.Header.Get(jetstream.SequenceHeader)
	seq, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("direct get: bad %s %q", jetstream.SequenceHeader, s)
	}
	return seq, nil
}
