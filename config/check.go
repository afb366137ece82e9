package config

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"

	"github.com/chatd/chatd/broker/service/webhook"
)

// checkURL reports a webhook URL that is not an absolute http(s) URL;
// empty is allowed (the feature is off). The error never repeats the URL,
// which may hold credentials and goes to logs.
func checkURL(key, raw string) error {
	if raw == "" {
		return nil
	}
	if err := webhook.CheckURL(raw); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	return nil
}

// Diff returns the keys whose values differ between a and b, in
// declaration order.
func Diff(a, b Config) []string {
	la, lb := leaves(a), leaves(b)
	var out []string
	for i := range la {
		if !reflect.DeepEqual(la[i].value, lb[i].value) {
			out = append(out, la[i].key)
		}
	}
	return out
}

// CheckFiles reads the files the configuration names, as the server
// would at start: the TLS certificates and keys (and that each key
// matches its certificate), the cluster's CA, the identity providers'
// public keys, and the chat page's directory. Validate checks the
// settings themselves; this catches a missing, unreadable or wrong file
// before a start or a restart fails on it.
func (c *Config) CheckFiles() error {
	var errs []error
	if c.TLS.CertFile != "" || c.TLS.KeyFile != "" {
		if _, err := tls.LoadX509KeyPair(c.TLS.CertFile, c.TLS.KeyFile); err != nil {
			errs = append(errs, fmt.Errorf("tls.cert_file, tls.key_file: %w", err))
		}
	}
	if t := c.Cluster.TLS; t.CertFile != "" && t.KeyFile != "" {
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			errs = append(errs, fmt.Errorf("cluster.tls.cert_file, cluster.tls.key_file: %w", err))
		}
	}
	if f := c.Cluster.TLS.CAFile; f != "" {
		b, err := os.ReadFile(f)
		if err == nil && !x509.NewCertPool().AppendCertsFromPEM(b) {
			err = errors.New("no PEM certificate in it")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster.tls.ca_file %s: %w", f, err))
		}
	}
	for i, is := range c.Auth.Issuers {
		if is.PublicKeyFile == "" {
			continue
		}
		b, err := os.ReadFile(is.PublicKeyFile)
		if err == nil {
			if blk, _ := pem.Decode(b); blk == nil {
				err = errors.New("no PEM block in it")
			} else if _, perr := x509.ParsePKIXPublicKey(blk.Bytes); perr != nil {
				err = fmt.Errorf("not a PEM public key: %w", perr)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("auth.issuers[%d].public_key_file %s: %w", i, is.PublicKeyFile, err))
		}
	}
	if c.Web.Enabled {
		if _, err := os.Stat(filepath.Join(c.Web.Dir, "index.html")); err != nil {
			errs = append(errs, fmt.Errorf("web.dir %s: the chat page is not built there (make web): %w", c.Web.Dir, err))
		}
	}
	return errors.Join(errs...)
}
