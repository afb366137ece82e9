package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/config"
)

// TestEchoBot runs the example against a real chatd: alice writes to
// echo over MQTT and gets her text back from it.
func TestEchoBot(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	secret := strings.Repeat("e", 32)
	dir := t.TempDir()
	k, key, err := apikeys.New("echobot", []string{apikeys.ScopeSend}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := apikeys.NewFile(filepath.Join(dir, apikeys.FileName)).Put(k); err != nil {
		t.Fatal(err)
	}
	bot := &Bot{Key: key, Secret: []byte(secret), Log: quiet}
	hook := httptest.NewServer(bot)
	defer hook.Close()

	cfg := config.Default()
	cfg.DataDir, cfg.Listen, cfg.HTTP = dir, "127.0.0.1:0", "127.0.0.1:0"
	cfg.Queue.MinFreeBytes = 1 << 20
	cfg.Events.Secret, cfg.Bots.Webhooks = secret, "echo="+hook.URL
	tokenSecret := []byte(strings.Repeat("t", 32))
	s, err := broker.New(broker.Options{Config: cfg, Secret: tokenSecret, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Error(err)
		}
	}()
	bot.Server = "http://" + s.HTTPAddr()

	tok, err := token.Mint(tokenSecret, "alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 10)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID("alice").SetUsername("alice").SetPassword(tok).SetCleanSession(false).SetAutoReconnect(false))
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	defer c.Disconnect(100)
	if tk := c.Subscribe("inbox/alice", 1, func(_ paho.Client, m paho.Message) { got <- m.Payload() }); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	if tk := c.Publish("inbox/echo", 1, false, `{"id":"m-1","text":"hello bot"}`); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish: %v", tk.Error())
	}
	deadline := time.After(20 * time.Second)
	for {
		select {
		case p := <-got:
			var e struct {
				Kind, From string
				Server     bool
				Msg        struct{ ID, Text string }
			}
			if err := json.Unmarshal(p, &e); err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			if e.Kind != "msg" {
				continue // the delivered receipt of m-1
			}
			if e.From != "echo" || !e.Server || e.Msg.ID != "re-m-1" || e.Msg.Text != "hello bot" {
				t.Fatalf("alice got %s, want echo's answer re-m-1", p)
			}
			return
		case <-deadline:
			t.Fatal("no answer from the bot in 20s")
		}
	}
}
