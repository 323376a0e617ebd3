// Package client is a typed client for stepserve's ImageGenerationService over gRPC, from the
// stubs `make clients` generates from proto/stepserve/v1 (package stepserve/gen/stepserve/v1,
// do not edit).
//
//	c, err := client.Dial(ctx, client.Options{Target: "127.0.0.1:50051"})
//	stream, err := c.Generate(ctx, &pb.GenerateRequest{Prompt: "a red circle", PreviewEveryNSteps: 1})
//	for {
//		ev, err := stream.Recv() // io.EOF after the Result
//		...
//	}
//
// Cancel a generation by cancelling its context: the server drops it at its next step.
package client

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "stepserve/gen/stepserve/v1"
)

// Options say how to reach a server.
type Options struct {
	// Target is host:port.
	Target string
	// TLS uses TLS with the system's roots (implied by CAFile or CertFile).
	TLS bool
	// CAFile is a PEM file of the CA to trust instead of the system's roots.
	CAFile string
	// CertFile and KeyFile are a PEM client certificate chain and key, for mutual TLS.
	CertFile, KeyFile string
	// Token is sent as "authorization: Bearer <token>" on every call.
	Token string
}

// Client calls one server (or a load balancer in front of several).
type Client struct {
	conn   *grpc.ClientConn
	Stub   pb.ImageGenerationServiceClient
	health healthpb.HealthClient
}

// FieldViolation is one field the server refused (google.rpc.BadRequest).
type FieldViolation struct {
	Field, Description string
}

// Error is a failed call: the gRPC status code and message, with the google.rpc details
// decoded: the fields a request got wrong and when to retry (zero: no advice).
type Error struct {
	Code            codes.Code
	Message         string
	FieldViolations []FieldViolation
	RetryAfter      time.Duration
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", CodeName(e.Code), e.Message)
}

// CodeName is gRPC's name of a status code, as the other clients spell it ("INVALID_ARGUMENT").
func CodeName(c codes.Code) string {
	name := c.String()
	var b strings.Builder
	for i, r := range name {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	if c == codes.Canceled {
		return "CANCELLED"
	}
	return strings.ToUpper(b.String())
}

// AsError turns a gRPC error into an *Error (nil and io.EOF pass through unchanged).
func AsError(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return err
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	st, _ := status.FromError(err)
	e = &Error{Code: st.Code(), Message: st.Message()}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{v.GetField(), v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			if delay := d.GetRetryDelay(); delay != nil {
				e.RetryAfter = time.Duration(delay.GetSeconds())*time.Second + time.Duration(delay.GetNanos())
			}
		}
	}
	return e
}

// Dial connects to the server in opts (lazily: the first call connects).
func Dial(ctx context.Context, opts Options) (*Client, error) {
	dial := []grpc.DialOption{}
	if opts.TLS || opts.CAFile != "" || opts.CertFile != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if opts.CAFile != "" {
			pem, err := os.ReadFile(opts.CAFile)
			if err != nil {
				return nil, err
			}
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%s: no PEM certificate", opts.CAFile)
			}
		}
		if opts.CertFile != "" {
			pair, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
			if err != nil {
				return nil, err
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	if opts.Token != "" {
		auth := "Bearer " + opts.Token
		dial = append(dial,
			grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
				return invoker(metadata.AppendToOutgoingContext(ctx, "authorization", auth), method, req, reply, cc, o...)
			}),
			grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, o ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(metadata.AppendToOutgoingContext(ctx, "authorization", auth), desc, cc, method, o...)
			}))
	}
	conn, err := grpc.DialContext(ctx, opts.Target, dial...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, Stub: pb.NewImageGenerationServiceClient(conn), health: healthpb.NewHealthClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Stream is one generation's events: Queued, Progress (with previews when asked), then one
// Result; Recv returns io.EOF after it, and failures as *Error.
type Stream struct {
	s pb.ImageGenerationService_GenerateClient
}

// Recv returns the next event.
func (s *Stream) Recv() (*pb.GenerateResponse, error) {
	ev, err := s.s.Recv()
	return ev, AsError(err)
}

// Routing hints for a proxy in front of several replicas (deploy/k8s/components/envoy/).
const (
	CacheKeyHeader = "x-stepserve-cache-key"
	LoraHeader     = "x-stepserve-lora"
)

// RoutingMetadata is the routing hints of req, as the Python client computes them: for a
// seeded request, the SHA-256 (first 32 hex digits) of its deterministic wire encoding without
// the fields that change no pixels (request id, priority, previews); the adapters' names,
// sorted, comma-separated. The server never reads them.
func RoutingMetadata(req *pb.GenerateRequest) map[string]string {
	out := map[string]string{}
	if req.Seed != nil {
		key := proto.Clone(req).(*pb.GenerateRequest)
		key.RequestId, key.Priority, key.PreviewEveryNSteps, key.PreviewMaxSizePx = "", pb.Priority_PRIORITY_UNSPECIFIED, 0, 0
		if wire, err := (proto.MarshalOptions{Deterministic: true}).Marshal(key); err == nil {
			sum := sha256.Sum256(wire)
			out[CacheKeyHeader] = hex.EncodeToString(sum[:])[:32]
		}
	}
	if len(req.GetLoras()) > 0 {
		seen := map[string]bool{}
		var names []string
		for _, l := range req.GetLoras() {
			if !seen[l.GetName()] {
				seen[l.GetName()] = true
				names = append(names, l.GetName())
			}
		}
		sort.Strings(names)
		out[LoraHeader] = strings.Join(names, ",")
	}
	return out
}

// Generate starts a generation, with its routing hints; cancel ctx to cancel it.
func (c *Client) Generate(ctx context.Context, req *pb.GenerateRequest) (*Stream, error) {
	for k, v := range RoutingMetadata(req) {
		ctx = metadata.AppendToOutgoingContext(ctx, k, v)
	}
	s, err := c.Stub.Generate(ctx, req)
	if err != nil {
		return nil, AsError(err)
	}
	return &Stream{s}, nil
}

// GenerateImages runs a generation to its end and returns its Result.
func (c *Client) GenerateImages(ctx context.Context, req *pb.GenerateRequest) (*pb.Result, error) {
	s, err := c.Generate(ctx, req)
	if err != nil {
		return nil, err
	}
	for {
		ev, err := s.Recv()
		if err == io.EOF {
			return nil, &Error{Code: codes.Internal, Message: "the stream ended without a result"}
		}
		if err != nil {
			return nil, err
		}
		if r := ev.GetResult(); r != nil {
			return r, nil
		}
	}
}

// ListModels describes the server's models, the default first.
func (c *Client) ListModels(ctx context.Context) ([]*pb.ModelInfo, error) {
	res, err := c.Stub.ListModels(ctx, &pb.ListModelsRequest{})
	if err != nil {
		return nil, AsError(err)
	}
	return res.GetModels(), nil
}

// IsServing asks grpc.health.v1 whether the server (service "") or one service is SERVING.
func (c *Client) IsServing(ctx context.Context, service string) (bool, error) {
	res, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return false, AsError(err)
	}
	return res.GetStatus() == healthpb.HealthCheckResponse_SERVING, nil
}
