package chatclient_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/chatd/chatd/sdk/go/chatclient"
)

// A bot that greets back whoever writes to it, keeping what it sends in
// a file outbox so that a restart loses nothing.
func Example() {
	outbox, err := chatclient.NewFileOutbox("greeter-outbox")
	if err != nil {
		log.Fatal(err)
	}
	c, err := chatclient.Dial(chatclient.Options{
		Server: "mqtt://127.0.0.1:1883",
		User:   "greeter", Device: "bot",
		// Your backend's tokens; `chatd token greeter` for development.
		Token:  func(context.Context) (string, error) { return "eyJ...", nil },
		Outbox: outbox,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.Close(ctx)
	}()
	for ev := range c.Events() {
		switch e := ev.(type) {
		case chatclient.Message:
			if e.Kind == "msg" {
				if _, err := c.Send(e.From, map[string]string{"text": "hello, " + e.From}); err != nil {
					log.Print(err)
				}
				if err := c.MarkRead(e.From, e.ID); err != nil {
					log.Print(err)
				}
			}
		case chatclient.Refused:
			fmt.Println("refused:", e.ID, e.Code)
		}
	}
}
