defmodule UroRecs.ZMTP do
  @moduledoc """
  ZMTP 3.x for a DEALER with the NULL mechanism, as a data structure: no process, no socket.

  This is what docs/PROTOCOL.md section 6 describes ("Without a ZeroMQ library"), written the
  Mint way: the process that owns the socket writes what the encoders below return, passes
  every chunk it reads to `feed/2`, and acts on the events that come back. Nothing here sends,
  receives, sleeps or keeps time.

  ## Writing

    * `greeting/0`: our 64-byte greeting (ZMTP 3.0, mechanism NULL, not as-server). Send it
      first.
    * `ready_command/1`: our READY command (`Socket-Type` = `"DEALER"`). Send it right after
      the greeting; there is no need to wait for the broker's greeting first. Send messages
      only once the `{:ready, _}` event has come: the broker drops a connection whose
      greeting, READY and first message arrive together (PROTOCOL.md section 6).
    * `encode_request/1`: one request, the two frames `[<<>>, body]`; `encode_message/1` for
      any list of frames.
    * `ping/2` and `pong/1`: the ZMTP 3.1 heartbeat commands. Answer every `{:ping, _, context}`
      event with `pong(context)`.

  ## Reading

  `new/1` makes a decoder; `feed/2` takes bytes in chunks of any size (one byte at a time
  works) and returns the events that the bytes completed, in order. The decoder goes through
  three states:

    * `:greeting`: waiting for the peer's 64-byte greeting. Its signature is checked as soon
      as its first 10 bytes are in, the rest once all 64 are: the major version must be 3 or
      more (the broker sends 3.1, fine: the framing is 3.0's), the mechanism NULL. Then it
      emits `{:greeting, %{major: _, minor: _, mechanism: "NULL", as_server: _}}` and moves to
      `:ready`.
    * `:ready`: waiting for the peer's READY command. Its properties are read until the
      command ends (the broker sends `Socket-Type` = `"ROUTER"` and an empty `Identity`);
      a `Socket-Type` other than `"ROUTER"` is an error. Then it emits
      `{:ready, %{"Socket-Type" => "ROUTER", "Identity" => ""}}` (the property names as the
      peer spelled them) and moves to `:open`. A message frame in this state is an error.
    * `:open`: messages and commands. Emits `{:message, [frame]}` for each complete message
      (its frames as binaries; a broker reply is `[<<>>, body]`). A second READY is an
      error.

  In `:ready` and `:open`, these commands become events; any other command is skipped:

    * `{:ping, ttl, context}`: the peer pings (`ttl` in tenths of a second, `context` 0 to
      16 bytes). The process must send `pong(context)`. The broker does not ping.
    * `{:pong, context}`: the answer to one of our `ping/2`s.
    * `{:error_command, reason}`: the peer refuses the connection (ZMTP ERROR command) and
      will close it.

  Commands may also arrive between the frames of a message (libzmq can put a heartbeat
  there); the message is not disturbed.

  `feed/2` returns `{:error, reason}` for anything that breaks the protocol; the decoder is
  then spent and the connection must be closed. Reasons:

    * `{:bad_signature, first_10_bytes}`, `{:unsupported_version, major, minor}`,
      `{:unsupported_mechanism, mechanism}`: the greeting.
    * `{:bad_socket_type, value_or_nil}`, `{:unexpected_command, "READY"}`,
      `{:malformed_command, name_or_nil}`, `:message_before_ready`: the handshake and
      commands.
    * `{:bad_flags, flags}`: a frame's flag byte has reserved bits, or a command has MORE.
    * `{:frame_too_large, size, max}`, `{:message_too_large, size, max}`,
      `{:too_many_frames, max}`: the memory limits of `new/1`, checked on a frame's size
      header before its body is buffered.

  ## Memory

  Input is kept as a list of chunks with its byte count and the byte count the next step
  needs (a whole frame header, then a whole frame), and joined only once enough has arrived,
  so a frame that comes in many small chunks is copied a bounded number of times, not once
  per chunk. The frames of `{:message, _}` are sub-binaries of the chunk they arrived in;
  copy them (`:binary.copy/1`) before keeping small parts of a large chunk for long.
  """

  import Bitwise

  @default_max_frame_size 64 * 1024 * 1024
  @default_max_message_size 64 * 1024 * 1024
  @default_max_frames 64

  @more 0x01
  @long 0x02
  @command 0x04

  @typedoc "A decoder. Build it with `new/1`, advance it with `feed/2`."
  @opaque t :: %__MODULE__{
            phase: phase(),
            buffer: iodata(),
            buffered: non_neg_integer(),
            need: pos_integer(),
            frames: [binary()],
            frame_count: non_neg_integer(),
            message_size: non_neg_integer(),
            max_frame_size: non_neg_integer(),
            max_message_size: non_neg_integer(),
            max_frames: pos_integer(),
            peer_socket_type: binary()
          }

  @typedoc "Where the decoder stands (see the moduledoc)."
  @type phase :: :greeting | :ready | :open

  @typedoc "The peer's greeting."
  @type greeting_info :: %{
          major: non_neg_integer(),
          minor: non_neg_integer(),
          mechanism: binary(),
          as_server: boolean()
        }

  @typedoc "What `feed/2` reports (see the moduledoc)."
  @type event ::
          {:greeting, greeting_info()}
          | {:ready, %{optional(binary()) => binary()}}
          | {:ping, ttl :: non_neg_integer(), context :: binary()}
          | {:pong, context :: binary()}
          | {:error_command, reason :: binary()}
          | {:message, [binary()]}

  @typedoc "Why `feed/2` gave up on the connection (see the moduledoc)."
  @type reason ::
          {:bad_signature, binary()}
          | {:unsupported_version, non_neg_integer(), non_neg_integer()}
          | {:unsupported_mechanism, binary()}
          | {:bad_socket_type, binary() | nil}
          | {:unexpected_command, binary()}
          | {:malformed_command, binary() | nil}
          | :message_before_ready
          | {:bad_flags, byte()}
          | {:frame_too_large, non_neg_integer(), non_neg_integer()}
          | {:message_too_large, non_neg_integer(), non_neg_integer()}
          | {:too_many_frames, pos_integer()}

  @typedoc """
  Options of `new/1`:

    * `:max_frame_size`: the largest frame (message frame or command) accepted, in bytes;
      default 64 MiB.
    * `:max_message_size`: the largest sum of the frames of one message; default 64 MiB.
    * `:max_frames`: the most frames in one message; default #{@default_max_frames}.
    * `:peer_socket_type`: the `Socket-Type` the peer's READY must declare; default
      `"ROUTER"` (the broker). A test double of the broker reads a client with `"DEALER"`.
  """
  @type option ::
          {:max_frame_size, non_neg_integer()}
          | {:max_message_size, non_neg_integer()}
          | {:max_frames, pos_integer()}
          | {:peer_socket_type, binary()}

  defstruct phase: :greeting,
            buffer: [],
            buffered: 0,
            need: 10,
            frames: [],
            frame_count: 0,
            message_size: 0,
            max_frame_size: @default_max_frame_size,
            max_message_size: @default_max_message_size,
            max_frames: @default_max_frames,
            peer_socket_type: "ROUTER"

  ## Writing

  @doc """
  Our 64-byte greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
  """
  @spec greeting() :: binary()
  def greeting do
    mechanism = "NULL" <> :binary.copy(<<0>>, 16)

    <<0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 0, mechanism::binary, 0,
      :binary.copy(<<0>>, 31)::binary>>
  end

  @doc """
  Our READY command for the NULL mechanism, declaring `socket_type` (default `"DEALER"`).
  """
  @spec ready_command(binary()) :: binary()
  def ready_command(socket_type \\ "DEALER") when is_binary(socket_type) do
    command("READY", property("Socket-Type", socket_type))
  end

  @doc """
  A PING command: `ttl_tenths` (0..65535) is how long the peer may wait for traffic before
  giving up on us, in tenths of a second (0: no such limit); `context` (0 to 16 bytes) comes
  back in the PONG.
  """
  @spec ping(0..65535, binary()) :: binary()
  def ping(ttl_tenths, context)
      when is_integer(ttl_tenths) and ttl_tenths in 0..65535 and is_binary(context) and
             byte_size(context) <= 16 do
    command("PING", <<ttl_tenths::16, context::binary>>)
  end

  @doc "A PONG command answering a PING that carried `context`."
  @spec pong(binary()) :: binary()
  def pong(context) when is_binary(context) and byte_size(context) <= 16 do
    command("PONG", context)
  end

  @doc """
  One message of one or more frames: MORE on every frame but the last, a 1-byte size below
  256 bytes and an 8-byte size (flag `0x02`) from 256 bytes.
  """
  @spec encode_message([iodata(), ...]) :: iodata()
  def encode_message([_ | _] = frames), do: encode_frames(frames)

  @doc "One request: the empty delimiter frame, then `body` (PROTOCOL.md section 1)."
  @spec encode_request(iodata()) :: iodata()
  def encode_request(body), do: encode_message([<<>>, body])

  defp encode_frames([last]), do: [frame_header(0, IO.iodata_length(last)), last]

  defp encode_frames([frame | rest]) do
    [frame_header(@more, IO.iodata_length(frame)), frame | encode_frames(rest)]
  end

  defp frame_header(flags, size) when size < 256, do: <<flags, size>>
  defp frame_header(flags, size), do: <<flags ||| @long, size::64>>

  defp command(name, data) do
    body = <<byte_size(name), name::binary, data::binary>>
    <<frame_header(@command, byte_size(body))::binary, body::binary>>
  end

  defp property(name, value) do
    <<byte_size(name), name::binary, byte_size(value)::32, value::binary>>
  end

  ## Reading

  @doc "A decoder waiting for the peer's greeting. See `t:option/0`."
  @spec new([option()]) :: t()
  def new(opts \\ []) do
    opts =
      Keyword.validate!(opts,
        max_frame_size: @default_max_frame_size,
        max_message_size: @default_max_message_size,
        max_frames: @default_max_frames,
        peer_socket_type: "ROUTER"
      )

    for {key, value} <- Keyword.delete(opts, :peer_socket_type) do
      minimum = if key == :max_frames, do: 1, else: 0

      unless is_integer(value) and value >= minimum do
        raise ArgumentError,
              "#{inspect(key)} must be an integer >= #{minimum}, got: #{inspect(value)}"
      end
    end

    struct!(__MODULE__, opts)
  end

  @doc "The decoder's state: `:greeting`, `:ready` or `:open`."
  @spec phase(t()) :: phase()
  def phase(%__MODULE__{phase: phase}), do: phase

  @doc """
  Takes the next bytes read from the peer; returns the events they complete, in order, or
  the reason the connection must be closed.
  """
  @spec feed(t(), binary()) :: {:ok, t(), [event()]} | {:error, reason()}
  def feed(%__MODULE__{} = t, bytes) when is_binary(bytes) do
    buffered = t.buffered + byte_size(bytes)

    if buffered < t.need do
      {:ok, %{t | buffer: [t.buffer | bytes], buffered: buffered}, []}
    else
      data = IO.iodata_to_binary([t.buffer | bytes])

      case parse(data, t, []) do
        {:more, rest, need, t, events} ->
          # A small tail of a large chunk is copied so that it does not keep the chunk alive.
          rest = if byte_size(rest) * 2 < byte_size(data), do: :binary.copy(rest), else: rest
          {:ok, %{t | buffer: rest, buffered: byte_size(rest), need: need}, Enum.reverse(events)}

        {:error, _reason} = error ->
          error
      end
    end
  end

  # parse/3 consumes whole units (the greeting, then frames) from `data` and returns
  # {:more, unconsumed, bytes_needed_from_its_start, t, reversed_events} or {:error, reason}.

  defp parse(data, %{phase: :greeting} = t, events) do
    case data do
      <<0xFF, _padding::binary-8, 0x7F, major, minor, mechanism::binary-20, as_server,
        _filler::binary-31, rest::binary>> ->
        mechanism = trim_zeros(mechanism)

        cond do
          major < 3 ->
            {:error, {:unsupported_version, major, minor}}

          mechanism != "NULL" ->
            {:error, {:unsupported_mechanism, mechanism}}

          true ->
            info = %{major: major, minor: minor, mechanism: mechanism, as_server: as_server != 0}
            parse(rest, %{t | phase: :ready}, [{:greeting, info} | events])
        end

      <<0xFF, _padding::binary-8, 0x7F, _::binary>> ->
        {:more, data, 64, t, events}

      <<signature::binary-10, _::binary>> ->
        {:error, {:bad_signature, signature}}

      _ ->
        {:more, data, 10, t, events}
    end
  end

  defp parse(data, t, events) do
    case data do
      <<flags, _::binary>> when (flags &&& 0xF8) != 0 ->
        {:error, {:bad_flags, flags}}

      <<flags, size::64, rest::binary>> when (flags &&& @long) != 0 ->
        frame(flags, size, 9, rest, data, t, events)

      <<flags, _::binary>> when (flags &&& @long) != 0 ->
        {:more, data, 9, t, events}

      <<flags, size, rest::binary>> ->
        frame(flags, size, 2, rest, data, t, events)

      _ ->
        {:more, data, 2, t, events}
    end
  end

  # Everything about a frame that its header tells is checked here, before its body is
  # waited for.
  defp frame(flags, size, header_size, rest, data, t, events) do
    command? = (flags &&& @command) != 0
    more? = (flags &&& @more) != 0

    cond do
      size > t.max_frame_size ->
        {:error, {:frame_too_large, size, t.max_frame_size}}

      command? and more? ->
        {:error, {:bad_flags, flags}}

      not command? and t.phase == :ready ->
        {:error, :message_before_ready}

      not command? and t.frame_count >= t.max_frames ->
        {:error, {:too_many_frames, t.max_frames}}

      not command? and t.message_size + size > t.max_message_size ->
        {:error, {:message_too_large, t.message_size + size, t.max_message_size}}

      byte_size(rest) < size ->
        {:more, data, header_size + size, t, events}

      command? ->
        <<body::binary-size(size), rest::binary>> = rest

        case handle_command(body, t) do
          {:ok, t, nil} -> parse(rest, t, events)
          {:ok, t, event} -> parse(rest, t, [event | events])
          {:error, _reason} = error -> error
        end

      more? ->
        <<body::binary-size(size), rest::binary>> = rest

        t = %{
          t
          | frames: [body | t.frames],
            frame_count: t.frame_count + 1,
            message_size: t.message_size + size
        }

        parse(rest, t, events)

      true ->
        <<body::binary-size(size), rest::binary>> = rest
        message = {:message, Enum.reverse([body | t.frames])}
        t = %{t | frames: [], frame_count: 0, message_size: 0}
        parse(rest, t, [message | events])
    end
  end

  defp handle_command(<<length, name::binary-size(length), data::binary>>, t) do
    case {name, t.phase} do
      {"READY", :ready} -> ready(data, t)
      {"READY", :open} -> {:error, {:unexpected_command, "READY"}}
      {"PING", _} -> ping_event(data, t)
      {"PONG", _} -> {:ok, t, {:pong, data}}
      {"ERROR", _} -> error_event(data, t)
      _ -> {:ok, t, nil}
    end
  end

  defp handle_command(_body, _t), do: {:error, {:malformed_command, nil}}

  defp ready(data, t) do
    with {:ok, properties} <- properties(data, %{}) do
      case socket_type(properties) do
        type when type == t.peer_socket_type -> {:ok, %{t | phase: :open}, {:ready, properties}}
        other -> {:error, {:bad_socket_type, other}}
      end
    end
  end

  # Properties run until the command's body ends.
  defp properties(<<>>, acc), do: {:ok, acc}

  defp properties(
         <<name_length, name::binary-size(name_length), value_length::32,
           value::binary-size(value_length), rest::binary>>,
         acc
       )
       when name_length > 0 do
    properties(rest, Map.put(acc, name, value))
  end

  defp properties(_data, _acc), do: {:error, {:malformed_command, "READY"}}

  # Property names are case-insensitive.
  defp socket_type(properties) do
    Enum.find_value(properties, fn {name, value} ->
      if String.downcase(name) == "socket-type", do: value
    end)
  end

  defp ping_event(<<ttl::16, context::binary>>, t), do: {:ok, t, {:ping, ttl, context}}
  defp ping_event(_data, _t), do: {:error, {:malformed_command, "PING"}}

  defp error_event(<<length, reason::binary-size(length)>>, t),
    do: {:ok, t, {:error_command, reason}}

  # A malformed ERROR still means the peer is closing: report what it sent.
  defp error_event(data, t), do: {:ok, t, {:error_command, data}}

  defp trim_zeros(binary) do
    case :binary.match(binary, <<0>>) do
      {at, _} -> binary_part(binary, 0, at)
      :nomatch -> binary
    end
  end
end
