package main

import (
	"github.com/spf13/cobra"
)

const rootLong = `chatd is a durable chat server spoken to over MQTT 3.1.1 or 5.0.

Each user connects with any stock MQTT client, with its user ID as username
and an access token (an HS256 JWT whose sub is the user ID) as password, and
subscribes at QoS 1 to inbox/{user}. A message published at QoS 1 to
inbox/{to} is stored durably before its PUBACK and is delivered to every
device of {to} until each has acknowledged it, even across restarts and
while the user is offline.

Quick start, with a development secret and the data in ./data:

  chatd serve

  # in another shell: alice listens on a persistent session (-c) ...
  mosquitto_sub -V mqttv311 -h 127.0.0.1 -p 1883 -q 1 -c -i alice/laptop \
      -u alice -P "$(chatd token alice --data-dir data)" -t inbox/alice

  # ... and bob writes to her
  mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 1883 -q 1 -i bob \
      -u bob -P "$(chatd token bob --data-dir data)" \
      -t inbox/alice -m '{"id":"m-1","text":"hi"}'

In production set auth.secret (or CHATD_AUTH_SECRET) to the secret your
account service signs tokens with; "chatd serve --help" lists every setting.`

// newRootCmd returns the chatd command with all its subcommands.
func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "chatd",
		Short: "Durable MQTT chat server",
		Long:  rootLong,
		// main prints the error once; usage is shown only for usage errors,
		// which cobra reports before RunE runs.
		SilenceErrors: true,
		// Cobra would otherwise add a "completion" command the project does
		// not document or test.
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
	}
	root.AddCommand(newServeCmd(), newTokenCmd(), newClusterCmd(), newAPIKeyCmd(),
		newVersionCmd(), newCheckConfigCmd(), newDefaultConfigCmd(), newProbeCmd())
	return root
}
