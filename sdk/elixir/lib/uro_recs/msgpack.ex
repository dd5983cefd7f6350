defmodule UroRecs.Msgpack do
  @default_max_depth 64
  @default_max_containers 100_000

  @moduledoc """
  A msgpack codec in pure Elixir, with no dependency and no process: terms in, iodata out;
  bytes in, terms out. It encodes request bodies and decodes reply bodies (docs/PROTOCOL.md,
  sections 2-5).

  ## Encoding (`encode/1`, `encode!/1`)

  | Elixir term | msgpack |
  |---|---|
  | `nil`, `true`, `false` | nil, true, false |
  | integer | the smallest encoding that holds it (positive fixint, uint8/16/32/64 for larger non-negatives; negative fixint, int8/16/32/64 for negatives), as Python's `msgpack.packb` does; outside `-2^63..2^64-1` it is an error |
  | float | float64 (as `msgpack.packb` does) |
  | binary (`String.t()`) | **always str** (fixstr/str8/str16/str32), never bin; it must be valid UTF-8, else `{:error, {:invalid_utf8, binary}}` |
  | `{:bin, binary}` | bin (bin8/16/32): the explicit wrapper for raw bytes |
  | any other atom | str of its name: `:recommend` -> `"recommend"`, `MyMod` -> `"Elixir.MyMod"`, `:infinity` -> `"infinity"` |
  | list | array (a charlist is a list of integers: an array of ints, not a str) |
  | map (not a struct) | map, in whatever order the map iterates |
  | `{:map, [{key, value}, ...]}` | map whose entries are written **in the order given** (for byte-exact bodies) |

  On the BEAM strings and binaries are one type, and the protocol requires str for every
  defined field and every key, hence binaries are always str and raw bytes need `{:bin, _}`.
  Atoms let bodies be written with atom keys (`%{v: 1, op: "info"}`). Structs, tuples other
  than the two wrappers, pids, references, functions, ports, improper lists and bitstrings
  that are not whole bytes are refused with `{:error, {:unsupported, term}}` (the term that
  could not be encoded); `encode/1` never raises. Non-finite floats cannot exist on the BEAM,
  so they cannot be encoded; ext types are not produced.

  The reference encoder writes maps in Python insertion order (`v`, `id`, `op`, `model`,
  `args`, `timeout_ms`): to reproduce its bytes exactly, pass ordered maps:

      iex> UroRecs.Msgpack.encode!({:map, [{"v", 1}, {"id", 4}, {"op", "info"}, {"args", %{}}]})
      <<0x84, 0xA1, ?v, 1, 0xA2, ?i, ?d, 4, 0xA2, ?o, ?p, 0xA4, ?i, ?n, ?f, ?o, 0xA4, ?a, ?r, ?g, ?s, 0x80>>

  Any key order is valid on the wire; the order only matters for comparing bytes.

  ## Decoding (`decode/2`, `decode!/2`)

  The input must be exactly one msgpack value: extra bytes are `{:error, :trailing_bytes}`,
  missing ones `{:error, :truncated}`.

  | msgpack | Elixir term |
  |---|---|
  | nil, true, false | `nil`, `true`, `false` |
  | every int width | integer |
  | float32, float64 | float; NaN, +Inf and -Inf (which a BEAM float cannot hold) decode to the atoms `:nan`, `:infinity`, `:neg_infinity` |
  | str | binary, checked to be valid UTF-8 (`{:error, :invalid_utf8}` otherwise) |
  | bin | `{:bin, binary}`: the same wrapper the encoder takes, so bin and str stay apart and every decoded value encodes back to the same types (the broker never sends bin) |
  | array | list |
  | map | map; str keys become binaries (`%{"v" => 1, ...}`), other keys decode like any value; a repeated key keeps its last value |
  | ext (any type, timestamp included) | `{:error, {:ext, type}}` |
  | `0xc1` (never used) | `{:error, {:invalid_type, 0xC1}}` |

  Replies come from a trusted broker, but the decoder is safe on any input: it is iterative
  (an explicit stack, no recursion per nesting level), every declared length of a str, bin,
  array or map is checked against the bytes left before anything is built (a header claiming
  four billion elements is `:truncated` at once), and two limits bound the work:

    * `:max_depth` (default #{@default_max_depth}): containers nested inside each other,
      the outermost counting as 1; past it, `{:error, :max_depth}`.
    * `:max_containers` (default #{@default_max_containers}): arrays and maps in the whole
      value, empty ones included; past it, `{:error, :max_containers}`.

  Decoded strings are sub-binaries of the input (no copy); keep `:binary.copy/1` in mind
  before storing a small piece of a large reply for a long time.

  ## Swapping in msgpax

  The client calls its codec through one configuration key, `codec: UroRecs.Msgpack`, and
  needs only `encode/1` (`{:ok, iodata} | {:error, reason}`) and `decode/1`
  (`{:ok, term} | {:error, reason}`). A deployment that already has `msgpax` can plug it in
  with a small adapter:

      defmodule MyApp.MsgpaxCodec do
        # Msgpax packs binaries as str by default (bin needs %Msgpax.Bin{}), and atoms as str.
        def encode(term), do: Msgpax.pack(term, iodata: false)
        def decode(binary), do: Msgpax.unpack(binary)
      end

      config :uro_recs, codec: MyApp.MsgpaxCodec

  Differences to know: the ordered-map form `{:map, pairs}` and the `{:bin, binary}` wrapper
  are `UroRecs.Msgpack` only (with msgpax, raw bytes are `Msgpax.Bin.new/1`, and key order is
  whatever the map's is); msgpax decodes bin to a plain binary (or `%Msgpax.Bin{}` with
  `binary: true`) and ext to `%Msgpax.Ext{}` rather than an error; its errors are
  `%Msgpax.PackError{}`/`%Msgpax.UnpackError{}` exceptions; and it has no `:max_depth` or
  `:max_containers` limits.
  """

  @typedoc "A term `encode/1` accepts."
  @type encodable ::
          nil
          | boolean
          | integer
          | float
          | String.t()
          | atom
          | [encodable]
          | %{optional(encodable) => encodable}
          | {:bin, binary}
          | {:map, [{encodable, encodable}]}

  @typedoc "A term `decode/2` returns."
  @type decoded ::
          nil
          | boolean
          | integer
          | float
          | :nan
          | :infinity
          | :neg_infinity
          | String.t()
          | {:bin, binary}
          | [decoded]
          | %{optional(decoded) => decoded}

  @type encode_error ::
          {:unsupported, term}
          | {:integer_out_of_range, integer}
          | {:invalid_utf8, binary}
          | {:too_large, :str | :bin | :array | :map, non_neg_integer}

  @type decode_error ::
          :truncated
          | :trailing_bytes
          | :invalid_utf8
          | {:invalid_type, 0xC1}
          | {:ext, integer}
          | :max_depth
          | :max_containers
          | :not_a_binary

  @type decode_opt :: {:max_depth, non_neg_integer} | {:max_containers, non_neg_integer}

  defmodule EncodeError do
    @moduledoc "Raised by `UroRecs.Msgpack.encode!/1`; `reason` is what `encode/1` returns."
    defexception [:reason]

    @impl true
    def message(%{reason: reason}), do: "cannot encode to msgpack: #{inspect(reason)}"
  end

  defmodule DecodeError do
    @moduledoc "Raised by `UroRecs.Msgpack.decode!/2`; `reason` is what `decode/2` returns."
    defexception [:reason]

    @impl true
    def message(%{reason: reason}), do: "cannot decode msgpack: #{inspect(reason)}"
  end

  ## Encoding

  @doc """
  Encodes `term` (see the table in the moduledoc) as iodata. Never raises.

      iex> UroRecs.Msgpack.encode(256) |> elem(1) |> IO.iodata_to_binary()
      <<0xCD, 1, 0>>
      iex> UroRecs.Msgpack.encode({1, 2})
      {:error, {:unsupported, {1, 2}}}
  """
  @spec encode(encodable) :: {:ok, iodata} | {:error, encode_error}
  def encode(term) do
    {:ok, enc(term)}
  catch
    :throw, {__MODULE__, reason} -> {:error, reason}
  end

  @doc """
  Like `encode/1`, but returns a binary and raises `UroRecs.Msgpack.EncodeError` on error.

      iex> UroRecs.Msgpack.encode!(%{"v" => 1})
      <<0x81, 0xA1, ?v, 1>>
  """
  @spec encode!(encodable) :: binary
  def encode!(term) do
    case encode(term) do
      {:ok, iodata} -> IO.iodata_to_binary(iodata)
      {:error, reason} -> raise EncodeError, reason: reason
    end
  end

  @compile {:inline, fail: 1}
  defp fail(reason), do: throw({__MODULE__, reason})

  defp enc(nil), do: <<0xC0>>
  defp enc(false), do: <<0xC2>>
  defp enc(true), do: <<0xC3>>
  defp enc(int) when is_integer(int), do: enc_int(int)
  defp enc(float) when is_float(float), do: <<0xCB, float::float-64>>

  defp enc(bin) when is_binary(bin) do
    if String.valid?(bin),
      do: [str_header(byte_size(bin)) | bin],
      else: fail({:invalid_utf8, bin})
  end

  defp enc(atom) when is_atom(atom) do
    name = Atom.to_string(atom)
    [str_header(byte_size(name)) | name]
  end

  defp enc(list) when is_list(list), do: enc_list(list, list, [], 0)
  defp enc({:bin, bin}) when is_binary(bin), do: [bin_header(byte_size(bin)) | bin]
  defp enc({:map, pairs} = term) when is_list(pairs), do: enc_pairs(pairs, term, [], 0)
  defp enc(%_{} = struct), do: fail({:unsupported, struct})

  defp enc(map) when is_map(map) do
    body = :maps.fold(fn key, value, acc -> [enc(key), enc(value) | acc] end, [], map)
    [map_header(map_size(map)) | body]
  end

  defp enc(other), do: fail({:unsupported, other})

  defp enc_int(i) when i >= 0 and i < 0x80, do: <<i>>
  defp enc_int(i) when i >= 0 and i < 0x100, do: <<0xCC, i>>
  defp enc_int(i) when i >= 0 and i < 0x10000, do: <<0xCD, i::16>>
  defp enc_int(i) when i >= 0 and i < 0x1_0000_0000, do: <<0xCE, i::32>>
  defp enc_int(i) when i >= 0 and i < 0x1_0000_0000_0000_0000, do: <<0xCF, i::64>>
  defp enc_int(i) when i >= -0x20 and i < 0, do: <<i::8-signed>>
  defp enc_int(i) when i >= -0x80 and i < 0, do: <<0xD0, i::8-signed>>
  defp enc_int(i) when i >= -0x8000 and i < 0, do: <<0xD1, i::16-signed>>
  defp enc_int(i) when i >= -0x8000_0000 and i < 0, do: <<0xD2, i::32-signed>>
  defp enc_int(i) when i >= -0x8000_0000_0000_0000 and i < 0, do: <<0xD3, i::64-signed>>
  defp enc_int(i), do: fail({:integer_out_of_range, i})

  defp enc_list([], _list, acc, n), do: [array_header(n) | :lists.reverse(acc)]
  defp enc_list([head | tail], list, acc, n), do: enc_list(tail, list, [enc(head) | acc], n + 1)
  defp enc_list(_improper_tail, list, _acc, _n), do: fail({:unsupported, list})

  defp enc_pairs([], _term, acc, n), do: [map_header(n) | :lists.reverse(acc)]

  defp enc_pairs([{key, value} | tail], term, acc, n),
    do: enc_pairs(tail, term, [enc(value), enc(key) | acc], n + 1)

  defp enc_pairs(_not_a_pair, term, _acc, _n), do: fail({:unsupported, term})

  defp str_header(n) when n < 32, do: <<0b101::3, n::5>>
  defp str_header(n) when n < 0x100, do: <<0xD9, n>>
  defp str_header(n) when n < 0x10000, do: <<0xDA, n::16>>
  defp str_header(n) when n < 0x1_0000_0000, do: <<0xDB, n::32>>
  defp str_header(n), do: fail({:too_large, :str, n})

  defp bin_header(n) when n < 0x100, do: <<0xC4, n>>
  defp bin_header(n) when n < 0x10000, do: <<0xC5, n::16>>
  defp bin_header(n) when n < 0x1_0000_0000, do: <<0xC6, n::32>>
  defp bin_header(n), do: fail({:too_large, :bin, n})

  defp array_header(n) when n < 16, do: <<0b1001::4, n::4>>
  defp array_header(n) when n < 0x10000, do: <<0xDC, n::16>>
  defp array_header(n) when n < 0x1_0000_0000, do: <<0xDD, n::32>>
  defp array_header(n), do: fail({:too_large, :array, n})

  defp map_header(n) when n < 16, do: <<0b1000::4, n::4>>
  defp map_header(n) when n < 0x10000, do: <<0xDE, n::16>>
  defp map_header(n) when n < 0x1_0000_0000, do: <<0xDF, n::32>>
  defp map_header(n), do: fail({:too_large, :map, n})

  ## Decoding

  @doc """
  Decodes exactly one msgpack value from `binary` (see the table in the moduledoc).

  Options: `:max_depth` (default #{@default_max_depth}) and `:max_containers` (default
  #{@default_max_containers}). Never raises on any input binary; raises `ArgumentError` only
  for invalid options.

      iex> UroRecs.Msgpack.decode(<<0x81, 0xA1, ?v, 1>>)
      {:ok, %{"v" => 1}}
      iex> UroRecs.Msgpack.decode(<<0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>)
      {:error, :truncated}
  """
  @spec decode(binary, [decode_opt]) :: {:ok, decoded} | {:error, decode_error}
  def decode(binary, opts \\ [])

  def decode(binary, opts) when is_binary(binary) do
    max_depth = limit_opt(opts, :max_depth, @default_max_depth)
    max_containers = limit_opt(opts, :max_containers, @default_max_containers)

    case value(binary, [], max_depth, max_containers) do
      {:ok, term, <<>>} -> {:ok, term}
      {:ok, _term, _rest} -> {:error, :trailing_bytes}
      {:error, _reason} = error -> error
    end
  end

  def decode(_not_a_binary, _opts), do: {:error, :not_a_binary}

  @doc """
  Like `decode/2`, but returns the term and raises `UroRecs.Msgpack.DecodeError` on error.
  """
  @spec decode!(binary, [decode_opt]) :: decoded
  def decode!(binary, opts \\ []) do
    case decode(binary, opts) do
      {:ok, term} -> term
      {:error, reason} -> raise DecodeError, reason: reason
    end
  end

  defp limit_opt(opts, key, default) do
    case Keyword.get(opts, key, default) do
      n when is_integer(n) and n >= 0 ->
        n

      other ->
        raise ArgumentError,
              "#{inspect(key)} must be a non-negative integer, got: #{inspect(other)}"
    end
  end

  # The decoder is one loop over two functions. `value/4` reads the next value at the head of
  # the bytes; a scalar (or an empty container) goes to `push/5`, a non-empty container
  # becomes a frame on `stack`. `push/5` hands a finished value to the innermost open
  # container, closing every container it completes. `depth` and `containers` count down the
  # nesting levels and containers still allowed.
  #
  # Frames: {:array, elements_left, reversed_elements}
  #         {:map_key, entries_left, reversed_pairs}
  #         {:map_value, entries_left, reversed_pairs, key}

  # nil, booleans, 0xc1
  defp value(<<0xC0, rest::binary>>, stack, depth, containers),
    do: push(rest, nil, stack, depth, containers)

  defp value(<<0xC2, rest::binary>>, stack, depth, containers),
    do: push(rest, false, stack, depth, containers)

  defp value(<<0xC3, rest::binary>>, stack, depth, containers),
    do: push(rest, true, stack, depth, containers)

  defp value(<<0xC1, _::binary>>, _stack, _depth, _containers),
    do: {:error, {:invalid_type, 0xC1}}

  # integers
  defp value(<<0::1, int::7, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0b111::3, int::5, rest::binary>>, stack, depth, containers),
    do: push(rest, int - 32, stack, depth, containers)

  defp value(<<0xCC, int::8, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xCD, int::16, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xCE, int::32, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xCF, int::64, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xD0, int::8-signed, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xD1, int::16-signed, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xD2, int::32-signed, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  defp value(<<0xD3, int::64-signed, rest::binary>>, stack, depth, containers),
    do: push(rest, int, stack, depth, containers)

  # floats (a NaN or an infinity does not match `float`: the next clauses take it)
  defp value(<<0xCA, float::float-32, rest::binary>>, stack, depth, containers),
    do: push(rest, float, stack, depth, containers)

  defp value(<<0xCA, sign::1, 0xFF::8, fraction::23, rest::binary>>, stack, depth, containers),
    do: push(rest, non_finite(sign, fraction), stack, depth, containers)

  defp value(<<0xCB, float::float-64, rest::binary>>, stack, depth, containers),
    do: push(rest, float, stack, depth, containers)

  defp value(<<0xCB, sign::1, 0x7FF::11, fraction::52, rest::binary>>, stack, depth, containers),
    do: push(rest, non_finite(sign, fraction), stack, depth, containers)

  # str (the size is matched against the bytes left: nothing is built when they are missing)
  defp value(<<0b101::3, n::5, str::binary-size(n), rest::binary>>, stack, depth, containers),
    do: str(str, rest, stack, depth, containers)

  defp value(<<0xD9, n::8, str::binary-size(n), rest::binary>>, stack, depth, containers),
    do: str(str, rest, stack, depth, containers)

  defp value(<<0xDA, n::16, str::binary-size(n), rest::binary>>, stack, depth, containers),
    do: str(str, rest, stack, depth, containers)

  defp value(<<0xDB, n::32, str::binary-size(n), rest::binary>>, stack, depth, containers),
    do: str(str, rest, stack, depth, containers)

  # bin
  defp value(<<0xC4, n::8, bin::binary-size(n), rest::binary>>, stack, depth, containers),
    do: push(rest, {:bin, bin}, stack, depth, containers)

  defp value(<<0xC5, n::16, bin::binary-size(n), rest::binary>>, stack, depth, containers),
    do: push(rest, {:bin, bin}, stack, depth, containers)

  defp value(<<0xC6, n::32, bin::binary-size(n), rest::binary>>, stack, depth, containers),
    do: push(rest, {:bin, bin}, stack, depth, containers)

  # arrays and maps
  defp value(<<0b1001::4, n::4, rest::binary>>, stack, depth, containers),
    do: array(rest, n, stack, depth, containers)

  defp value(<<0xDC, n::16, rest::binary>>, stack, depth, containers),
    do: array(rest, n, stack, depth, containers)

  defp value(<<0xDD, n::32, rest::binary>>, stack, depth, containers),
    do: array(rest, n, stack, depth, containers)

  defp value(<<0b1000::4, n::4, rest::binary>>, stack, depth, containers),
    do: map(rest, n, stack, depth, containers)

  defp value(<<0xDE, n::16, rest::binary>>, stack, depth, containers),
    do: map(rest, n, stack, depth, containers)

  defp value(<<0xDF, n::32, rest::binary>>, stack, depth, containers),
    do: map(rest, n, stack, depth, containers)

  # ext types: refused as soon as their type byte is known
  defp value(<<tag, type::8-signed, _::binary>>, _stack, _depth, _containers)
       when tag in 0xD4..0xD8,
       do: {:error, {:ext, type}}

  defp value(<<0xC7, _n::8, type::8-signed, _::binary>>, _stack, _depth, _containers),
    do: {:error, {:ext, type}}

  defp value(<<0xC8, _n::16, type::8-signed, _::binary>>, _stack, _depth, _containers),
    do: {:error, {:ext, type}}

  defp value(<<0xC9, _n::32, type::8-signed, _::binary>>, _stack, _depth, _containers),
    do: {:error, {:ext, type}}

  # Every byte value has a clause above: what is left is a value cut short.
  defp value(_bytes, _stack, _depth, _containers), do: {:error, :truncated}

  defp non_finite(_sign, fraction) when fraction != 0, do: :nan
  defp non_finite(0, 0), do: :infinity
  defp non_finite(1, 0), do: :neg_infinity

  defp str(str, rest, stack, depth, containers) do
    if String.valid?(str),
      do: push(rest, str, stack, depth, containers),
      else: {:error, :invalid_utf8}
  end

  defp array(_rest, _n, _stack, 0, _containers), do: {:error, :max_depth}
  defp array(_rest, _n, _stack, _depth, 0), do: {:error, :max_containers}
  defp array(rest, 0, stack, depth, containers), do: push(rest, [], stack, depth, containers - 1)

  # Every element takes at least one byte.
  defp array(rest, n, stack, depth, containers) when n <= byte_size(rest),
    do: value(rest, [{:array, n, []} | stack], depth - 1, containers - 1)

  defp array(_rest, _n, _stack, _depth, _containers), do: {:error, :truncated}

  defp map(_rest, _n, _stack, 0, _containers), do: {:error, :max_depth}
  defp map(_rest, _n, _stack, _depth, 0), do: {:error, :max_containers}
  defp map(rest, 0, stack, depth, containers), do: push(rest, %{}, stack, depth, containers - 1)

  # Every entry takes at least two bytes.
  defp map(rest, n, stack, depth, containers) when n * 2 <= byte_size(rest),
    do: value(rest, [{:map_key, n, []} | stack], depth - 1, containers - 1)

  defp map(_rest, _n, _stack, _depth, _containers), do: {:error, :truncated}

  defp push(rest, term, [], _depth, _containers), do: {:ok, term, rest}

  defp push(rest, term, [{:array, 1, acc} | stack], depth, containers),
    do: push(rest, :lists.reverse(acc, [term]), stack, depth + 1, containers)

  defp push(rest, term, [{:array, n, acc} | stack], depth, containers),
    do: value(rest, [{:array, n - 1, [term | acc]} | stack], depth, containers)

  defp push(rest, key, [{:map_key, n, acc} | stack], depth, containers),
    do: value(rest, [{:map_value, n, acc, key} | stack], depth, containers)

  # :maps.from_list/1 keeps the last of repeated keys, as Python's dict does.
  defp push(rest, term, [{:map_value, 1, acc, key} | stack], depth, containers),
    do:
      push(
        rest,
        :maps.from_list(:lists.reverse(acc, [{key, term}])),
        stack,
        depth + 1,
        containers
      )

  defp push(rest, term, [{:map_value, n, acc, key} | stack], depth, containers),
    do: value(rest, [{:map_key, n - 1, [{key, term} | acc]} | stack], depth, containers)
end
