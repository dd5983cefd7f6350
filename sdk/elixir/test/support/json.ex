defmodule UroRecs.Test.JSON do
  @moduledoc """
  A small, strict JSON decoder (RFC 8259) for the tests, which read docs/vectors/v1.json
  with no JSON library available. Not part of the library.

  Objects decode to maps with string keys, or, with `ordered: true`, to `{:map, pairs}`
  with the pairs in the order written (the ordered-map form `UroRecs.Msgpack.encode/1`
  takes). Numbers without a fraction or an exponent are integers, the others floats. A
  repeated key in an object is an error.
  """

  @type result :: {:ok, term} | {:error, term}

  @spec decode(binary, ordered: boolean) :: result
  def decode(text, opts \\ []) when is_binary(text) do
    ordered? = Keyword.get(opts, :ordered, false)
    {value, rest} = value(skip_ws(text), ordered?)

    case skip_ws(rest) do
      <<>> -> {:ok, value}
      rest -> {:error, {:trailing, rest}}
    end
  catch
    :throw, {__MODULE__, reason} -> {:error, reason}
  end

  defp fail(reason), do: throw({__MODULE__, reason})

  defp skip_ws(<<c, rest::binary>>) when c in [?\s, ?\t, ?\n, ?\r], do: skip_ws(rest)
  defp skip_ws(text), do: text

  defp value(<<?{, rest::binary>>, ordered?), do: object(skip_ws(rest), ordered?, [])
  defp value(<<?[, rest::binary>>, ordered?), do: array(skip_ws(rest), ordered?, [])
  defp value(<<?", rest::binary>>, _ordered?), do: string(rest, [])
  defp value(<<"true", rest::binary>>, _ordered?), do: {true, rest}
  defp value(<<"false", rest::binary>>, _ordered?), do: {false, rest}
  defp value(<<"null", rest::binary>>, _ordered?), do: {nil, rest}
  defp value(<<c, _::binary>> = text, _ordered?) when c == ?- or c in ?0..?9, do: number(text)
  defp value(text, _ordered?), do: fail({:unexpected, snippet(text)})

  defp object(<<?}, rest::binary>>, ordered?, []), do: {build_object(ordered?, []), rest}

  defp object(<<?", rest::binary>>, ordered?, pairs) do
    {key, rest} = string(rest, [])

    case skip_ws(rest) do
      <<?:, rest::binary>> ->
        {value, rest} = value(skip_ws(rest), ordered?)
        pairs = [{key, value} | pairs]

        case skip_ws(rest) do
          <<?,, rest::binary>> -> object(skip_ws(rest), ordered?, pairs)
          <<?}, rest::binary>> -> {build_object(ordered?, :lists.reverse(pairs)), rest}
          rest -> fail({:expected_comma_or_brace, snippet(rest)})
        end

      rest ->
        fail({:expected_colon, snippet(rest)})
    end
  end

  defp object(text, _ordered?, _pairs), do: fail({:expected_key, snippet(text)})

  defp build_object(ordered?, pairs) do
    map = Map.new(pairs)

    if map_size(map) != length(pairs) do
      keys = Enum.map(pairs, &elem(&1, 0))
      fail({:duplicate_key, hd(keys -- Enum.uniq(keys))})
    end

    if ordered?, do: {:map, pairs}, else: map
  end

  defp array(<<?], rest::binary>>, _ordered?, []), do: {[], rest}

  defp array(text, ordered?, acc) do
    {value, rest} = value(text, ordered?)

    case skip_ws(rest) do
      <<?,, rest::binary>> -> array(skip_ws(rest), ordered?, [value | acc])
      <<?], rest::binary>> -> {:lists.reverse(acc, [value]), rest}
      rest -> fail({:expected_comma_or_bracket, snippet(rest)})
    end
  end

  @escapes %{
    ?" => ?",
    ?\\ => ?\\,
    ?/ => ?/,
    ?b => ?\b,
    ?f => ?\f,
    ?n => ?\n,
    ?r => ?\r,
    ?t => ?\t
  }

  defp string(<<?", rest::binary>>, acc), do: {IO.iodata_to_binary(acc), rest}

  defp string(<<?\\, ?u, hex::binary-size(4), rest::binary>>, acc) do
    case hex4(hex) do
      high when high in 0xD800..0xDBFF ->
        with <<?\\, ?u, hex::binary-size(4), rest::binary>> <- rest,
             low when low in 0xDC00..0xDFFF <- hex4(hex) do
          code = 0x10000 + Bitwise.bsl(high - 0xD800, 10) + (low - 0xDC00)
          string(rest, [acc, <<code::utf8>>])
        else
          _ -> fail({:lone_surrogate, high})
        end

      low when low in 0xDC00..0xDFFF ->
        fail({:lone_surrogate, low})

      code ->
        string(rest, [acc, <<code::utf8>>])
    end
  end

  defp string(<<?\\, c, rest::binary>>, acc) when is_map_key(@escapes, c),
    do: string(rest, [acc, Map.fetch!(@escapes, c)])

  defp string(<<?\\, _::binary>> = text, _acc), do: fail({:bad_escape, snippet(text)})
  defp string(<<c, _::binary>>, _acc) when c < 0x20, do: fail({:control_character, c})
  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [acc, <<c::utf8>>])
  defp string(<<>>, _acc), do: fail(:unterminated_string)
  defp string(text, _acc), do: fail({:invalid_utf8, snippet(text)})

  defp hex4(hex) do
    if hex =~ ~r/\A[0-9a-fA-F]{4}\z/,
      do: String.to_integer(hex, 16),
      else: fail({:bad_unicode_escape, hex})
  end

  @number ~r/\A-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/

  defp number(text) do
    case Regex.run(@number, text, capture: :all) do
      nil ->
        fail({:bad_number, snippet(text)})

      [literal | fraction_or_exponent] ->
        rest = binary_part(text, byte_size(literal), byte_size(text) - byte_size(literal))
        {to_number(literal, Enum.any?(fraction_or_exponent, &(&1 != ""))), rest}
    end
  end

  defp to_number(literal, false = _float?), do: String.to_integer(literal)

  defp to_number(literal, true = _float?) do
    case Float.parse(literal) do
      {float, ""} -> float
      _ -> fail({:float_out_of_range, literal})
    end
  end

  defp snippet(text), do: binary_part(text, 0, min(byte_size(text), 20))
end
