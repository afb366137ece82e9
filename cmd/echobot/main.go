// Command echobot is the smallest chatd bot, to copy from: a webhook that
// checks each request's signature and answers every message with its own
// text, through the server API's send call (docs/PROTOCOL.md section 7,
// "Bots").
//
//	CHATD_API_KEY=$(chatd apikey create echobot --scope send) \
//	CHATD_EVENTS_SECRET=... echobot --listen 127.0.0.1:9000 --server http://127.0.0.1:8080
//
// and run chatd with bots.webhooks set to echobot=http://127.0.0.1:9000/
// and the same events.secret.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/chatd/chatd/broker/service/bots"
	"github.com/chatd/chatd/broker/service/events"
)

// maxBody bounds a request from chatd (a message envelope and its frame).
const maxBody = 1 << 20

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "echobot:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("echobot", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:9000", "address the webhook listens on")
	server := fs.String("server", "http://127.0.0.1:8080", "chatd's HTTP address, for the send call")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: echobot [flags]\n\nA chatd bot that answers every message with its text.\nEnvironment: CHATD_API_KEY (scope send), CHATD_EVENTS_SECRET (chatd's events.secret).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	b := &Bot{Server: *server, Key: os.Getenv("CHATD_API_KEY"), Secret: []byte(os.Getenv("CHATD_EVENTS_SECRET")), Log: slog.Default()}
	if b.Key == "" || len(b.Secret) == 0 {
		return errors.New("set CHATD_API_KEY and CHATD_EVENTS_SECRET")
	}
	srv := &http.Server{Addr: *listen, Handler: b, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			slog.Error("shutdown", "error", err)
		}
	}()
	slog.Info("echobot listening", "addr", *listen, "server", *server)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Bot answers the messages chatd POSTs to it.
type Bot struct {
	// Server is chatd's HTTP base URL; Key an API key with scope send.
	Server, Key string
	// Secret is chatd's events.secret, which signs the requests.
	Secret []byte
	// Client makes the send calls; nil means http.DefaultClient.
	Client *http.Client
	// Log receives failures.
	Log *slog.Logger
}

// ServeHTTP takes one message: 2xx tells chatd it is taken (deleted from
// the bot's queue), anything else that it is to come again.
func (b *Bot) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return
	}
	if err := events.Verify(r.Header, b.Secret, body, time.Now(), 5*time.Minute); err != nil {
		http.Error(w, err.Error(), http.StatusUnauthorized)
		return
	}
	var req bots.Request
	var env struct {
		Kind string `json:"kind"`
		From string `json:"from"`
		Msg  struct {
			ID   string `json:"id"`
			Text string `json:"text"`
		} `json:"msg"`
	}
	if err := json.Unmarshal(body, &req); err != nil || json.Unmarshal(req.Message, &env) != nil {
		// Not ours to fix by retrying: taken, and logged.
		b.Log.Error("undecodable request", "error", err)
		return
	}
	if env.Kind != "msg" {
		// Receipts of the bot's answers: nothing to answer.
		return
	}
	// The answer's id comes from the message's, so a retried request
	// is a duplicate of the first answer, not a second one.
	if err := b.send(r.Context(), req.Bot, env.From, "re-"+env.Msg.ID, env.Msg.Text); err != nil {
		b.Log.Warn("answer not sent; chatd will retry", "to", env.From, "error", err)
		http.Error(w, "answer not sent", http.StatusBadGateway)
	}
}

// send calls the server API's send as from.
func (b *Bot) send(ctx context.Context, from, to, id, text string) error {
	body, err := json.Marshal(map[string]any{"from": from, "to": []string{to}, "message": map[string]string{"id": id, "text": text}})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.Server+"/v1/server/messages", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+b.Key)
	c := b.Client
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	ans, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("send answered %s: %s", resp.Status, ans)
	}
	return nil
}
